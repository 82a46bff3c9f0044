//! Bodies of the cargo-fuzz targets in `fuzz/`. They live in the library so
//! that ordinary tests run them over the committed seed corpus, and each
//! asserts the property its target checks. Not part of the stable API.

use crate::format::{
    OpKind, RecordBuilder, SEGMENT_HEADER_LEN, SegmentHeader, decode_op, decode_record,
};

/// `record_decode`: arbitrary bytes as a segment header, a record, an
/// operation and a whole segment. Decoding never panics, and whatever
/// decodes re-encodes to exactly the same bytes.
pub fn record_decode(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..SEGMENT_HEADER_LEN]);
    }
    if let Ok(record) = decode_record(data) {
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
    if let Ok((op, len)) = decode_op(data) {
        let mut b = RecordBuilder::new(None);
        let at = match op.kind {
            OpKind::Put => b.push_put(op.key, op.value, op.expire_ts),
            OpKind::Delete => b.push_delete(op.key),
        } as usize;
        assert_eq!(&b.as_bytes()[at..at + len], &data[..len]);
    }
    // As a segment: read records one after another until one fails.
    let mut at = SEGMENT_HEADER_LEN.min(data.len());
    while let Ok(r) = decode_record(&data[at..]) {
        at += r.bytes().len();
    }
}
