//! Segment header: the first 32 bytes of every segment file.
//!
//! ```text
//! 0        8          10       12           16               24         28         32
//! | magic  | version  | kind   | segment id | base position  | reserved | crc32    |
//! | 8 B    | u16      | u16    | u32        | u64            | u32 = 0  | of 0..28 |
//! ```
//!
//! A merged segment (kind 2) follows it with a merge header:
//!
//! ```text
//! 32             40                48         52         56
//! | end position | applied number  | reserved | crc32    |
//! | u64          | u64             | u32 = 0  | of 32..52|
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, take};
use crate::log::SegmentId;

/// Magic bytes that open every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DKVCASK\0";
/// The format version this build writes.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format version this build reads (version 1 had only log
/// segments, laid out as in version 2).
pub const MIN_FORMAT_VERSION: u16 = 1;
/// Length of the segment header in bytes.
pub const SEGMENT_HEADER_LEN: usize = CRC + 4;

const MAGIC: usize = 0;
const VERSION: usize = MAGIC + 8;
const KIND: usize = VERSION + 2;
const ID: usize = KIND + 2;
const BASE: usize = ID + 4;
const RESERVED: usize = BASE + 8;
const CRC: usize = RESERVED + 4;

/// What a segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Records appended by the write path, at consecutive log positions.
    Log = 1,
    /// The output of a merge: the live operations (and needed tombstones)
    /// of a run of older segments, each with its original change number,
    /// covering the log range named by its [`MergeHeader`]. Since version 2.
    Merged = 2,
}

impl SegmentKind {
    pub(crate) fn from_u16(v: u16) -> Result<Self, FormatError> {
        match v {
            1 => Ok(SegmentKind::Log),
            2 => Ok(SegmentKind::Merged),
            other => Err(FormatError::UnknownSegmentKind(other)),
        }
    }

    /// File offset of a segment's first record: after the segment header,
    /// and for a merged segment after its merge header too.
    pub const fn records_start(self) -> usize {
        match self {
            SegmentKind::Log => SEGMENT_HEADER_LEN,
            SegmentKind::Merged => SEGMENT_HEADER_LEN + MERGE_HEADER_LEN,
        }
    }
}

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// What the segment holds.
    pub kind: SegmentKind,
    /// The segment's id, equal to the number in its file name.
    pub id: SegmentId,
    /// Logical log position at which the segment's first record starts.
    pub base_position: u64,
}

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[MAGIC..VERSION].copy_from_slice(&SEGMENT_MAGIC);
        LE::write_u16(&mut b[VERSION..KIND], FORMAT_VERSION);
        LE::write_u16(&mut b[KIND..ID], self.kind as u16);
        LE::write_u32(&mut b[ID..BASE], self.id.0);
        LE::write_u64(&mut b[BASE..RESERVED], self.base_position);
        let crc = super::crc32(&b[..CRC]);
        LE::write_u32(&mut b[CRC..], crc);
        b
    }

    /// Decodes and verifies a header from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let b: [u8; SEGMENT_HEADER_LEN] = take(buf, 0)?;
        if b[MAGIC..VERSION] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if super::crc32(&b[..CRC]) != LE::read_u32(&b[CRC..]) {
            return Err(FormatError::BadSegmentHeaderChecksum);
        }
        let version = LE::read_u16(&b[VERSION..KIND]);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if LE::read_u32(&b[RESERVED..CRC]) != 0 {
            return Err(FormatError::NonZeroReserved);
        }
        let kind = SegmentKind::from_u16(LE::read_u16(&b[KIND..ID]))?;
        if version < 2 && kind != SegmentKind::Log {
            return Err(FormatError::Invalid(
                "a version 1 segment must be a log segment",
            ));
        }
        Ok(SegmentHeader {
            kind,
            id: SegmentId(LE::read_u32(&b[ID..BASE])),
            base_position: LE::read_u64(&b[BASE..RESERVED]),
        })
    }
}

/// Length of a merged segment's merge header in bytes.
pub const MERGE_HEADER_LEN: usize = M_CRC + 4 - SEGMENT_HEADER_LEN;

const M_END: usize = SEGMENT_HEADER_LEN;
const M_APPLIED: usize = M_END + 8;
const M_RESERVED: usize = M_APPLIED + 8;
const M_CRC: usize = M_RESERVED + 4;

/// What a merged segment covers, stored after its segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeHeader {
    /// End (exclusive) of the log range the segment replaces; its start is
    /// the segment header's base position. Every change number in the
    /// segment lies in `(base, end]`.
    pub end_position: u64,
    /// The highest applied change number (replication) any replaced record
    /// carried, so merging never lowers a replica's applied number.
    pub applied: u64,
}

impl MergeHeader {
    /// Encodes the merge header (the bytes at offsets 32..56 of the file).
    pub fn encode(&self) -> [u8; MERGE_HEADER_LEN] {
        let mut b = [0u8; MERGE_HEADER_LEN];
        let at = |o: usize| o - SEGMENT_HEADER_LEN;
        LE::write_u64(&mut b[at(M_END)..], self.end_position);
        LE::write_u64(&mut b[at(M_APPLIED)..], self.applied);
        let crc = super::crc32(&b[..at(M_CRC)]);
        LE::write_u32(&mut b[at(M_CRC)..], crc);
        b
    }

    /// Decodes and verifies the merge header of a merged segment whose
    /// whole file (or at least its first 56 bytes) is `file`.
    pub fn decode(file: &[u8]) -> Result<Self, FormatError> {
        let b: [u8; MERGE_HEADER_LEN] = take(file, SEGMENT_HEADER_LEN)?;
        let at = |o: usize| o - SEGMENT_HEADER_LEN;
        if super::crc32(&b[..at(M_CRC)]) != LE::read_u32(&b[at(M_CRC)..]) {
            return Err(FormatError::BadSegmentHeaderChecksum);
        }
        if LE::read_u32(&b[at(M_RESERVED)..]) != 0 {
            return Err(FormatError::NonZeroReserved);
        }
        Ok(MergeHeader {
            end_position: LE::read_u64(&b[at(M_END)..]),
            applied: LE::read_u64(&b[at(M_APPLIED)..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentHeader {
        SegmentHeader {
            kind: SegmentKind::Log,
            id: SegmentId(7),
            base_position: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn header_encodes_to_the_documented_golden_bytes() {
        let mut expected = Vec::new();
        expected.extend_from_slice(b"DKVCASK\0");
        expected.extend_from_slice(&[2, 0]); // version 2
        expected.extend_from_slice(&[1, 0]); // kind Log
        expected.extend_from_slice(&[7, 0, 0, 0]); // segment id
        expected.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // base position
        expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
        expected.extend_from_slice(&crc32fast::hash(&expected).to_le_bytes());
        assert_eq!(sample().encode().as_slice(), expected.as_slice());
        assert_eq!(SEGMENT_HEADER_LEN, 32);
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(SegmentHeader::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn every_truncation_is_reported_not_panicked() {
        let b = sample().encode();
        for len in 0..b.len() {
            assert!(matches!(
                SegmentHeader::decode(&b[..len]),
                Err(FormatError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let b = sample().encode();
        for bit in 0..b.len() * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&c).is_err(), "bit {bit} undetected");
        }
    }

    #[test]
    fn another_version_is_reported_as_unsupported() {
        let mut b = sample().encode();
        LE::write_u16(&mut b[VERSION..KIND], 3);
        let crc = crc32fast::hash(&b[..CRC]);
        LE::write_u32(&mut b[CRC..], crc);
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(FormatError::UnsupportedVersion(3))
        );
    }

    fn with_version_and_kind(version: u16, kind: u16) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = sample().encode();
        LE::write_u16(&mut b[VERSION..KIND], version);
        LE::write_u16(&mut b[KIND..ID], kind);
        let crc = crc32fast::hash(&b[..CRC]);
        LE::write_u32(&mut b[CRC..], crc);
        b
    }

    #[test]
    fn version_one_log_segments_still_open_but_version_one_merged_ones_do_not_exist() {
        assert_eq!(
            SegmentHeader::decode(&with_version_and_kind(1, 1)),
            Ok(sample())
        );
        assert!(SegmentHeader::decode(&with_version_and_kind(1, 2)).is_err());
        assert_eq!(
            SegmentHeader::decode(&with_version_and_kind(2, 2)).map(|h| h.kind),
            Ok(SegmentKind::Merged)
        );
        assert_eq!(
            SegmentHeader::decode(&with_version_and_kind(2, 3)),
            Err(FormatError::UnknownSegmentKind(3))
        );
    }

    fn merge_sample() -> MergeHeader {
        MergeHeader {
            end_position: 0x1112_1314_1516_1718,
            applied: 5,
        }
    }

    #[test]
    fn merge_header_encodes_to_the_documented_golden_bytes() {
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        expected.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]); // applied
        expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
        expected.extend_from_slice(&crc32fast::hash(&expected).to_le_bytes());
        assert_eq!(merge_sample().encode().as_slice(), expected.as_slice());
        assert_eq!(MERGE_HEADER_LEN, 24);
        assert_eq!(SegmentKind::Merged.records_start(), 56);
    }

    #[test]
    fn merge_header_round_trips_and_detects_every_bit_flip_and_truncation() {
        let mut file = sample().encode().to_vec();
        file.extend_from_slice(&merge_sample().encode());
        assert_eq!(MergeHeader::decode(&file), Ok(merge_sample()));
        for len in 0..file.len() {
            assert!(MergeHeader::decode(&file[..len]).is_err(), "len {len}");
        }
        for bit in SEGMENT_HEADER_LEN * 8..file.len() * 8 {
            let mut c = file.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(MergeHeader::decode(&c).is_err(), "bit {bit} undetected");
        }
    }
}
