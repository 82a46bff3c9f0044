//! The snapshot stream (`get_snapshot` / `put_snapshot`), version 1: a
//! header, framed entries, and a trailer with the count and a checksum of
//! everything before it.
//!
//! ```text
//! header (40 bytes)
//! 0          8         10         12              20                28             36
//! | magic    | version | reserved | change number | applied number | created unix | crc32 of 0..36 |
//! | 8 B      | u16     | u16 = 0  | u64           | u64            | u64          | u32            |
//!
//! entry:   | body len u32 | body crc32 u32 | key len u16 | expire ts u64 | key | value |
//!            body = key len .. value; body len >= 10, <= 10 + MAX_KEY_LEN + MAX_VALUE_LEN
//! trailer: | 0xFFFF_FFFF u32 | entry count u64 | crc32 u32 of every byte before the trailer |
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, take};
use crate::options::{MAX_KEY_LEN, MAX_VALUE_LEN};

/// Magic bytes that open a snapshot stream.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"DKVSNAP\0";
/// The snapshot format version this build writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;
/// Length of the snapshot header.
pub const SNAPSHOT_HEADER_LEN: usize = S_CRC + 4;
/// Length of an entry's frame (body length and body checksum).
pub const ENTRY_FRAME_LEN: usize = 8;
/// Fixed part of an entry's body (key length and expiry).
pub const ENTRY_FIXED_LEN: usize = 10;
/// The body length that marks the trailer.
pub const TRAILER_MARK: u32 = u32::MAX;
/// Length of the trailer after its mark (count and checksum).
pub const TRAILER_REST_LEN: usize = 12;
/// Largest body an entry may have.
pub const MAX_ENTRY_BODY: usize = ENTRY_FIXED_LEN + MAX_KEY_LEN + MAX_VALUE_LEN;

const S_MAGIC: usize = 0;
const S_VERSION: usize = S_MAGIC + 8;
const S_RESERVED: usize = S_VERSION + 2;
const S_CHANGE: usize = S_RESERVED + 2;
const S_APPLIED: usize = S_CHANGE + 8;
const S_CREATED: usize = S_APPLIED + 8;
const S_CRC: usize = S_CREATED + 8;

/// The decoded snapshot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The change number the snapshot stands at.
    pub change_number: u64,
    /// The master change number the store had applied (replicas).
    pub applied: u64,
    /// When the snapshot was taken, in Unix seconds.
    pub created_unix: u64,
}

impl SnapshotHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SNAPSHOT_HEADER_LEN] {
        let mut b = [0u8; SNAPSHOT_HEADER_LEN];
        b[S_MAGIC..S_VERSION].copy_from_slice(&SNAPSHOT_MAGIC);
        LE::write_u16(&mut b[S_VERSION..], SNAPSHOT_VERSION);
        LE::write_u64(&mut b[S_CHANGE..], self.change_number);
        LE::write_u64(&mut b[S_APPLIED..], self.applied);
        LE::write_u64(&mut b[S_CREATED..], self.created_unix);
        let crc = super::crc32(&b[..S_CRC]);
        LE::write_u32(&mut b[S_CRC..], crc);
        b
    }

    /// Decodes and verifies a header.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let b: [u8; SNAPSHOT_HEADER_LEN] = take(buf, 0)?;
        if b[S_MAGIC..S_VERSION] != SNAPSHOT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if super::crc32(&b[..S_CRC]) != LE::read_u32(&b[S_CRC..]) {
            return Err(FormatError::BadSegmentHeaderChecksum);
        }
        let version = LE::read_u16(&b[S_VERSION..]);
        if version != SNAPSHOT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if LE::read_u16(&b[S_RESERVED..]) != 0 {
            return Err(FormatError::NonZeroReserved);
        }
        Ok(SnapshotHeader {
            change_number: LE::read_u64(&b[S_CHANGE..]),
            applied: LE::read_u64(&b[S_APPLIED..]),
            created_unix: LE::read_u64(&b[S_CREATED..]),
        })
    }
}

/// Appends one entry to `out`.
pub fn encode_entry(out: &mut Vec<u8>, key: &[u8], value: &[u8], expire_ts: u64) {
    let body_len = ENTRY_FIXED_LEN + key.len() + value.len();
    let at = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&expire_ts.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = super::crc32(&out[at + ENTRY_FRAME_LEN..]);
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Checks an entry's body length before anything is read or allocated.
pub fn check_body_len(body_len: u32) -> Result<usize, FormatError> {
    let len = body_len as usize;
    if !(ENTRY_FIXED_LEN..=MAX_ENTRY_BODY).contains(&len) {
        return Err(FormatError::Invalid("entry length out of range"));
    }
    Ok(len)
}

/// Verifies an entry body against its checksum; returns key, value, expiry.
pub fn decode_entry_body(body: &[u8], crc: u32) -> Result<(&[u8], &[u8], u64), FormatError> {
    if super::crc32(body) != crc {
        return Err(FormatError::BadPayloadChecksum);
    }
    let fixed: [u8; ENTRY_FIXED_LEN] = take(body, 0)?;
    let key_len = usize::from(LE::read_u16(&fixed[0..2]));
    let expire_ts = LE::read_u64(&fixed[2..10]);
    let key = body
        .get(ENTRY_FIXED_LEN..ENTRY_FIXED_LEN + key_len)
        .ok_or(FormatError::Invalid("key longer than its entry"))?;
    if key.is_empty() {
        return Err(FormatError::Invalid("empty key"));
    }
    let value = &body[ENTRY_FIXED_LEN + key_len..];
    if value.len() > MAX_VALUE_LEN {
        return Err(FormatError::Invalid("value too long"));
    }
    Ok((key, value, expire_ts))
}

/// Appends the trailer for `count` entries and the checksum of everything
/// before it.
pub fn encode_trailer(out: &mut Vec<u8>, count: u64, crc: u32) {
    out.extend_from_slice(&TRAILER_MARK.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the trailer's count and checksum.
pub fn decode_trailer(rest: &[u8; TRAILER_REST_LEN]) -> (u64, u32) {
    (LE::read_u64(&rest[0..8]), LE::read_u32(&rest[8..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_encodes_to_the_documented_golden_bytes() {
        let h = SnapshotHeader {
            change_number: 0x0102,
            applied: 3,
            created_unix: 4,
        };
        let mut expected = b"DKVSNAP\0".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0]);
        expected.extend_from_slice(&0x0102u64.to_le_bytes());
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(&4u64.to_le_bytes());
        expected.extend_from_slice(&crc32fast::hash(&expected).to_le_bytes());
        assert_eq!(h.encode().to_vec(), expected);
        assert_eq!(SnapshotHeader::decode(&expected), Ok(h));
    }

    #[test]
    fn entry_encodes_to_the_documented_golden_bytes_and_round_trips() {
        let mut out = Vec::new();
        encode_entry(&mut out, b"k", b"vv", 7);
        let mut body = vec![1, 0];
        body.extend_from_slice(&7u64.to_le_bytes());
        body.extend_from_slice(b"kvv");
        let mut expected = (body.len() as u32).to_le_bytes().to_vec();
        expected.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(out, expected);
        let crc = u32::from_le_bytes(out[4..8].try_into().unwrap());
        assert_eq!(
            decode_entry_body(&out[8..], crc),
            Ok((&b"k"[..], &b"vv"[..], 7))
        );
    }

    #[test]
    fn lengths_out_of_range_are_refused_before_reading() {
        assert!(check_body_len(9).is_err());
        assert!(check_body_len(u32::MAX - 1).is_err());
        assert!(check_body_len(10).is_ok());
    }
}
