//! Segment header: the first 32 bytes of every segment file.
//!
//! ```text
//! 0        8          10       12           16               24         28         32
//! | magic  | version  | kind   | segment id | base position  | reserved | crc32    |
//! | 8 B    | u16      | u16    | u32        | u64            | u32 = 0  | of 0..28 |
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, take};
use crate::log::SegmentId;

/// Magic bytes that open every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DKVCASK\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
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
}

impl SegmentKind {
    fn from_u16(v: u16) -> Result<Self, FormatError> {
        match v {
            1 => Ok(SegmentKind::Log),
            other => Err(FormatError::UnknownSegmentKind(other)),
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
        let crc = crc32fast::hash(&b[..CRC]);
        LE::write_u32(&mut b[CRC..], crc);
        b
    }

    /// Decodes and verifies a header from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let b: [u8; SEGMENT_HEADER_LEN] = take(buf, 0)?;
        if b[MAGIC..VERSION] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if crc32fast::hash(&b[..CRC]) != LE::read_u32(&b[CRC..]) {
            return Err(FormatError::BadSegmentHeaderChecksum);
        }
        let version = LE::read_u16(&b[VERSION..KIND]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if LE::read_u32(&b[RESERVED..CRC]) != 0 {
            return Err(FormatError::NonZeroReserved);
        }
        Ok(SegmentHeader {
            kind: SegmentKind::from_u16(LE::read_u16(&b[KIND..ID]))?,
            id: SegmentId(LE::read_u32(&b[ID..BASE])),
            base_position: LE::read_u64(&b[BASE..RESERVED]),
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
        expected.extend_from_slice(&[1, 0]); // version 1
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
        LE::write_u16(&mut b[VERSION..KIND], 2);
        let crc = crc32fast::hash(&b[..CRC]);
        LE::write_u32(&mut b[CRC..], crc);
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(FormatError::UnsupportedVersion(2))
        );
    }
}
