//! The on-disk format, version 2: segment headers, records, merged
//! records, hint files and the keydir file. This is the
//! only code that knows byte offsets; everything else calls these encoders and
//! decoders. Decoders are total: they check every length against what remains
//! and return a [`FormatError`], never panic. See DESIGN.md for the diagrams.

mod hint;
mod keydir_file;
mod record;
mod segment;
pub mod snapshot;

pub use hint::{
    HINT_ENTRY_LEN, HINT_HEADER_LEN, HINT_MAGIC, HINT_SAMPLE_LEN, HINT_VERSION, Hint, HintBuilder,
    HintEntry, HintHeader, sample_crc,
};
pub use keydir_file::{
    KEYDIR_ENTRY_LEN, KEYDIR_HEADER_LEN, KEYDIR_MAGIC, KEYDIR_SEGMENT_LEN, KEYDIR_START_LEN,
    KEYDIR_VERSION, KeydirEntries, KeydirFile, KeydirFileBuilder, KeydirSegment,
};
pub(crate) use record::decode_verified_record;
pub use record::{
    APPLIED_LEN, FLAG_APPLIED, MERGED_CN_LEN, MergedBuilder, OP_HEADER_LEN, Op, OpIter, OpKind,
    RECORD_HEADER_LEN, Record, RecordBuilder, RecordHeader, RecordKind, decode_header, decode_op,
    decode_record, op_key,
};
pub use segment::{
    FORMAT_VERSION, MERGE_HEADER_LEN, MIN_FORMAT_VERSION, MergeHeader, SEGMENT_HEADER_LEN,
    SEGMENT_MAGIC, SegmentHeader, SegmentKind,
};

/// The CRC-32 (IEEE) of `bytes`: what `crc32fast::hash` returns, without
/// its CPU-feature detection on every call (some 25 instructions, a sixth
/// of the checksum of a 100-byte record). A hasher set up once is copied.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    static SET_UP: std::sync::OnceLock<crc32fast::Hasher> = std::sync::OnceLock::new();
    let mut h = SET_UP.get_or_init(crc32fast::Hasher::new).clone();
    h.update(bytes);
    h.finalize()
}

/// Why bytes failed to decode. Callers attach the file and offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes remain than the structure needs.
    #[error("truncated: needs {needed} bytes, {available} remain")]
    Truncated {
        /// Bytes the structure needs.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A segment file does not start with the segment magic.
    #[error("bad segment magic")]
    BadMagic,
    /// A segment header's checksum does not match.
    #[error("segment header checksum mismatch")]
    BadSegmentHeaderChecksum,
    /// A segment was written by another format version.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    /// A segment header names a kind this version does not know.
    #[error("unknown segment kind {0}")]
    UnknownSegmentKind(u16),
    /// A record header's checksum does not match.
    #[error("record header checksum mismatch")]
    BadHeaderChecksum,
    /// A record payload's checksum does not match.
    #[error("record payload checksum mismatch")]
    BadPayloadChecksum,
    /// An operation's checksum does not match.
    #[error("operation checksum mismatch")]
    BadOpChecksum,
    /// A record kind this version does not know.
    #[error("unknown record kind {0}")]
    UnknownRecordKind(u8),
    /// An operation kind this version does not know.
    #[error("unknown operation kind {0}")]
    UnknownOpKind(u8),
    /// A reserved field or flag bit is not zero.
    #[error("reserved field is not zero")]
    NonZeroReserved,
    /// A field holds a value its structure forbids.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Most bytes a record can add around its operations (segment header,
/// record header, applied number); used to size `max_batch_bytes`.
pub const fn max_overhead() -> u64 {
    (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + APPLIED_LEN) as u64
}

/// Reads `N` bytes at `at`, or reports how many were missing.
pub(crate) fn take<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], FormatError> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(FormatError::Truncated {
            needed: (at as u64).saturating_add(N as u64),
            available: buf.len() as u64,
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checksum_is_crc32_ieee() {
        // The standard check value of CRC-32 (IEEE 802.3).
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(super::crc32(b""), 0);
    }

    #[test]
    fn the_checksum_is_crc32fasts_for_every_length_and_alignment() {
        let bytes: Vec<u8> = (0..1200u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in (0..300).chain([511, 512, 513, 1024, 1099]) {
            for at in [0, 1, 3] {
                let b = &bytes[at..at + len];
                assert_eq!(super::crc32(b), crc32fast::hash(b), "{len} bytes at {at}");
            }
        }
    }
}
