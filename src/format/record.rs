//! Records: one atomic batch of operations, framed and checksummed.
//!
//! ```text
//! record header (40 bytes)
//! 0          4             8             12     13      14         16         20         24              32                40
//! | hdr crc  | payload len | payload crc | kind | flags | reserved | op count | reserved | change number | synced position |
//! | u32      | u32         | u32         | u8   | u8    | u16 = 0  | u32      | u32 = 0  | u64           | u64             |
//!   crc32 of bytes 4..40, so no length is trusted before it is verified
//!
//! payload (payload len bytes, crc32 = payload crc)
//! [applied change number: u64, only when flags & FLAG_APPLIED]
//! op count operations (at least one, unless FLAG_APPLIED is set), each:
//! 0         4      5          6         8           12          20
//! | op crc  | kind | reserved | key len | value len | expire ts | key | value |
//! | u32     | u8   | u8 = 0   | u16     | u32       | u64       |     |       |
//!   crc32 of bytes 4..end of the operation, so a point read verifies alone
//!
//! merged record (kind 2, only in merged segments): flags 0, synced position
//! 0, change number = the highest of its operations'; the payload is
//! op count × [change number u64][operation as above], so each operation
//! keeps the change number of the record it was first written in, and a
//! point read decodes it exactly as in a log segment.
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FormatError, take};

/// Length of the record header in bytes.
pub const RECORD_HEADER_LEN: usize = SYNCED + 8;
/// Length of an operation's fixed header in bytes.
pub const OP_HEADER_LEN: usize = OP_EXPIRE + 8;
/// Length of the optional applied-change-number field.
pub const APPLIED_LEN: usize = 8;
/// Length of the change number before each operation of a merged record.
pub const MERGED_CN_LEN: usize = 8;
/// Flag: the payload starts with the master's applied change number.
pub const FLAG_APPLIED: u8 = 1;

const HDR_CRC: usize = 0;
const PAYLOAD_LEN: usize = HDR_CRC + 4;
const PAYLOAD_CRC: usize = PAYLOAD_LEN + 4;
const KIND: usize = PAYLOAD_CRC + 4;
const FLAGS: usize = KIND + 1;
const RESERVED16: usize = FLAGS + 1;
const OP_COUNT: usize = RESERVED16 + 2;
const RESERVED32: usize = OP_COUNT + 4;
const CHANGE_NUMBER: usize = RESERVED32 + 4;
const SYNCED: usize = CHANGE_NUMBER + 8;

const OP_CRC: usize = 0;
const OP_KIND: usize = OP_CRC + 4;
const OP_RESERVED: usize = OP_KIND + 1;
const OP_KEY_LEN: usize = OP_RESERVED + 1;
const OP_VALUE_LEN: usize = OP_KEY_LEN + 2;
const OP_EXPIRE: usize = OP_VALUE_LEN + 4;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A batch of put and delete operations applied atomically.
    Batch = 1,
    /// Operations copied by a merge, each with its own change number.
    Merged = 2,
}

/// What one operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Associates the key with the value and expiry.
    Put = 1,
    /// Removes the key.
    Delete = 2,
}

/// One decoded operation, borrowing from the record's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op<'a> {
    /// Put or delete.
    pub kind: OpKind,
    /// The key.
    pub key: &'a [u8],
    /// The value (empty for a delete).
    pub value: &'a [u8],
    /// Absolute expiry in Unix seconds, 0 = never (0 for a delete).
    pub expire_ts: u64,
}

/// The decoded, verified record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub payload_len: u32,
    /// crc32 of the payload.
    pub payload_crc: u32,
    /// Record kind.
    pub kind: RecordKind,
    /// Flag bits ([`FLAG_APPLIED`]).
    pub flags: u8,
    /// Number of operations in the payload.
    pub op_count: u32,
    /// The record's change number: the logical log position at its end.
    pub change_number: u64,
    /// A log position known durable when the record was written.
    pub synced_position: u64,
}

impl RecordHeader {
    /// Whole record length (header plus payload) in bytes.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }
}

/// Decodes and verifies a record header at the start of `buf`.
pub fn decode_header(buf: &[u8]) -> Result<RecordHeader, FormatError> {
    let b: [u8; RECORD_HEADER_LEN] = take(buf, 0)?;
    if super::crc32(&b[PAYLOAD_LEN..]) != LE::read_u32(&b[HDR_CRC..]) {
        return Err(FormatError::BadHeaderChecksum);
    }
    if LE::read_u16(&b[RESERVED16..]) != 0 || LE::read_u32(&b[RESERVED32..]) != 0 {
        return Err(FormatError::NonZeroReserved);
    }
    let kind = match b[KIND] {
        1 => RecordKind::Batch,
        2 => RecordKind::Merged,
        other => return Err(FormatError::UnknownRecordKind(other)),
    };
    let flags = b[FLAGS];
    if flags & !FLAG_APPLIED != 0 {
        return Err(FormatError::NonZeroReserved);
    }
    if kind == RecordKind::Merged && (flags != 0 || LE::read_u64(&b[SYNCED..]) != 0) {
        return Err(FormatError::Invalid(
            "a merged record carries no flags and no synced position",
        ));
    }
    let header = RecordHeader {
        payload_len: LE::read_u32(&b[PAYLOAD_LEN..]),
        payload_crc: LE::read_u32(&b[PAYLOAD_CRC..]),
        kind,
        flags,
        op_count: LE::read_u32(&b[OP_COUNT..]),
        change_number: LE::read_u64(&b[CHANGE_NUMBER..]),
        synced_position: LE::read_u64(&b[SYNCED..]),
    };
    let min_payload = if flags & FLAG_APPLIED != 0 {
        APPLIED_LEN
    } else {
        0
    };
    if (header.payload_len as usize) < min_payload {
        return Err(FormatError::Invalid(
            "payload shorter than its applied field",
        ));
    }
    if header.synced_position > header.change_number {
        return Err(FormatError::Invalid(
            "synced position beyond the record's end",
        ));
    }
    Ok(header)
}

/// A record borrowing from the bytes it was decoded from, verified by
/// [`decode_record`] (the crate may read the same bytes again later
/// without checking them twice).
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// The header.
    pub header: RecordHeader,
    /// The master's applied change number, for records written by an applier.
    pub applied: Option<u64>,
    bytes: &'a [u8],
    ops_start: usize,
}

impl<'a> Record<'a> {
    /// The operations, in order, each with its offset from the record start.
    pub fn ops(&self) -> impl Iterator<Item = (u32, Op<'a>)> + use<'a> {
        self.entries().map(|(at, _, op)| (at, op))
    }

    /// The operations, in order, each with its offset from the record start
    /// and its change number (the record's own in a batch; each
    /// operation's own in a merged record). They were verified when the
    /// record was decoded, so iterating checks no checksum again.
    pub fn entries(&self) -> OpIter<'a> {
        OpIter {
            bytes: self.bytes,
            at: self.ops_start,
            merged: self.header.kind == RecordKind::Merged,
            change_number: self.header.change_number,
        }
    }

    /// The record's bytes, header included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Iterator over a verified record's operations: (offset of the operation
/// from the record start, change number, operation).
#[derive(Clone, Debug)]
pub struct OpIter<'a> {
    bytes: &'a [u8],
    at: usize,
    merged: bool,
    change_number: u64,
}

impl<'a> Iterator for OpIter<'a> {
    type Item = (u32, u64, Op<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The record was verified by decode_record, so these decode.
        let mut change_number = self.change_number;
        if self.merged {
            change_number = LE::read_u64(&take::<MERGED_CN_LEN>(self.bytes, self.at).ok()?);
            self.at += MERGED_CN_LEN;
        }
        let rest = self.bytes.get(self.at..)?;
        let (op, len) = decode_verified_op(rest)?;
        let at = self.at;
        self.at += len;
        Some((at as u32, change_number, op))
    }
}

/// Decodes and fully verifies a record at the start of `buf`: header,
/// payload checksum, every operation's framing and checksum, the operation
/// count, and that nothing trails the last operation.
pub fn decode_record(buf: &[u8]) -> Result<Record<'_>, FormatError> {
    let header = decode_header(buf)?;
    let len = usize::try_from(header.record_len()).map_err(|_| FormatError::Truncated {
        needed: header.record_len(),
        available: buf.len() as u64,
    })?;
    let bytes = buf.get(..len).ok_or(FormatError::Truncated {
        needed: header.record_len(),
        available: buf.len() as u64,
    })?;
    let merged = header.kind == RecordKind::Merged;
    if !merged && header.change_number < header.record_len() {
        return Err(FormatError::Invalid(
            "change number below the record's own length",
        ));
    }
    let payload = &bytes[RECORD_HEADER_LEN..];
    if super::crc32(payload) != header.payload_crc {
        return Err(FormatError::BadPayloadChecksum);
    }
    let mut at = RECORD_HEADER_LEN;
    let applied = if header.flags & FLAG_APPLIED != 0 {
        let v = LE::read_u64(&take::<APPLIED_LEN>(bytes, at)?);
        at += APPLIED_LEN;
        Some(v)
    } else {
        None
    };
    let ops_start = at;
    let mut count = 0u32;
    let mut highest = 0u64;
    while at < len {
        if merged {
            let cn = LE::read_u64(&take::<MERGED_CN_LEN>(bytes, at)?);
            if cn == 0 || cn > header.change_number {
                return Err(FormatError::Invalid(
                    "merged operation's change number outside its record's",
                ));
            }
            highest = highest.max(cn);
            at += MERGED_CN_LEN;
        }
        let (_, op_len) = decode_op(&bytes[at..])?;
        at += op_len;
        count = count
            .checked_add(1)
            .ok_or(FormatError::Invalid("operation count overflows"))?;
    }
    if count != header.op_count {
        return Err(FormatError::Invalid(
            "operation count does not match the header",
        ));
    }
    if merged && highest != header.change_number {
        return Err(FormatError::Invalid(
            "merged record's change number is not its highest operation's",
        ));
    }
    if count == 0 && applied.is_none() {
        // Only an applier's record may carry nothing but its applied number
        // (a change whose operations were all of unknown types).
        return Err(FormatError::Invalid("record without operations"));
    }
    Ok(Record {
        header,
        applied,
        bytes,
        ops_start,
    })
}

/// Decodes a record that [`decode_record`] has verified before, from the
/// same bytes, without checking anything again: the framing is read, no
/// checksum is computed. Bounds are still respected, so bytes that were
/// never verified give `None` or garbage, never a panic.
pub(crate) fn decode_verified_record(buf: &[u8]) -> Option<Record<'_>> {
    let b: [u8; RECORD_HEADER_LEN] = take(buf, 0).ok()?;
    let flags = b[FLAGS];
    let header = RecordHeader {
        payload_len: LE::read_u32(&b[PAYLOAD_LEN..]),
        payload_crc: LE::read_u32(&b[PAYLOAD_CRC..]),
        kind: if b[KIND] == 2 {
            RecordKind::Merged
        } else {
            RecordKind::Batch
        },
        flags,
        op_count: LE::read_u32(&b[OP_COUNT..]),
        change_number: LE::read_u64(&b[CHANGE_NUMBER..]),
        synced_position: LE::read_u64(&b[SYNCED..]),
    };
    let bytes = buf.get(..usize::try_from(header.record_len()).ok()?)?;
    let (applied, ops_start) = if flags & FLAG_APPLIED != 0 {
        let v = LE::read_u64(&take::<APPLIED_LEN>(bytes, RECORD_HEADER_LEN).ok()?);
        (Some(v), RECORD_HEADER_LEN + APPLIED_LEN)
    } else {
        (None, RECORD_HEADER_LEN)
    };
    Some(Record {
        header,
        applied,
        bytes,
        ops_start,
    })
}

/// Decodes an operation of a verified record: framing only, no checksum.
fn decode_verified_op(buf: &[u8]) -> Option<(Op<'_>, usize)> {
    let h: [u8; OP_HEADER_LEN] = take(buf, 0).ok()?;
    let key_len = usize::from(LE::read_u16(&h[OP_KEY_LEN..]));
    let len = OP_HEADER_LEN + key_len + LE::read_u32(&h[OP_VALUE_LEN..]) as usize;
    let bytes = buf.get(..len)?;
    let kind = if h[OP_KIND] == 2 {
        OpKind::Delete
    } else {
        OpKind::Put
    };
    Some((
        Op {
            kind,
            key: &bytes[OP_HEADER_LEN..OP_HEADER_LEN + key_len],
            value: &bytes[OP_HEADER_LEN + key_len..],
            expire_ts: LE::read_u64(&h[OP_EXPIRE..]),
        },
        len,
    ))
}

/// Decodes and verifies one operation at the start of `buf`; returns it and
/// its encoded length.
pub fn decode_op(buf: &[u8]) -> Result<(Op<'_>, usize), FormatError> {
    let h: [u8; OP_HEADER_LEN] = take(buf, 0)?;
    let key_len = usize::from(LE::read_u16(&h[OP_KEY_LEN..]));
    let value_len = LE::read_u32(&h[OP_VALUE_LEN..]) as usize;
    let len = OP_HEADER_LEN + key_len + value_len;
    let bytes = buf.get(..len).ok_or(FormatError::Truncated {
        needed: len as u64,
        available: buf.len() as u64,
    })?;
    if super::crc32(&bytes[OP_KIND..]) != LE::read_u32(&h[OP_CRC..]) {
        return Err(FormatError::BadOpChecksum);
    }
    if h[OP_RESERVED] != 0 {
        return Err(FormatError::NonZeroReserved);
    }
    let expire_ts = LE::read_u64(&h[OP_EXPIRE..]);
    let kind = match h[OP_KIND] {
        1 => OpKind::Put,
        2 => OpKind::Delete,
        other => return Err(FormatError::UnknownOpKind(other)),
    };
    if key_len == 0 {
        return Err(FormatError::Invalid("empty key"));
    }
    if kind == OpKind::Delete && (value_len != 0 || expire_ts != 0) {
        return Err(FormatError::Invalid("delete with a value or expiry"));
    }
    let key = &bytes[OP_HEADER_LEN..OP_HEADER_LEN + key_len];
    let value = &bytes[OP_HEADER_LEN + key_len..];
    Ok((
        Op {
            kind,
            key,
            value,
            expire_ts,
        },
        len,
    ))
}

/// Appends one encoded operation to `buf`; returns where it starts. The
/// caller has checked the key and value lengths.
fn encode_op(buf: &mut Vec<u8>, kind: OpKind, key: &[u8], value: &[u8], expire_ts: u64) -> usize {
    debug_assert!(!key.is_empty() && key.len() <= u16::MAX as usize);
    let at = buf.len();
    let mut h = [0u8; OP_HEADER_LEN];
    h[OP_KIND] = kind as u8;
    LE::write_u16(&mut h[OP_KEY_LEN..], key.len() as u16);
    LE::write_u32(&mut h[OP_VALUE_LEN..], value.len() as u32);
    LE::write_u64(&mut h[OP_EXPIRE..], expire_ts);
    buf.reserve(OP_HEADER_LEN + key.len() + value.len());
    buf.extend_from_slice(&h);
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = super::crc32(&buf[at + OP_KIND..]);
    LE::write_u32(&mut buf[at..at + 4], crc);
    at
}

/// The key of the encoded operation at the start of `buf`, without
/// verifying its checksum (for an operation already verified once).
pub fn op_key(buf: &[u8]) -> Option<&[u8]> {
    let h: [u8; OP_HEADER_LEN] = take(buf, 0).ok()?;
    let key_len = usize::from(LE::read_u16(&h[OP_KEY_LEN..]));
    buf.get(OP_HEADER_LEN..OP_HEADER_LEN + key_len)
}

/// Builds one record in a reusable buffer: push operations, then
/// [`stamp`](Self::stamp) the header once the log position is known.
#[derive(Clone, Debug)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    op_count: u32,
    flags: u8,
}

impl Default for RecordBuilder {
    fn default() -> Self {
        Self::new(None)
    }
}

impl RecordBuilder {
    /// An empty record; `applied` is the master's change number an applier
    /// records together with the data.
    pub fn new(applied: Option<u64>) -> Self {
        let mut b = RecordBuilder {
            buf: Vec::with_capacity(256),
            op_count: 0,
            flags: 0,
        };
        b.reset(applied);
        b
    }

    /// Empties the builder for reuse.
    pub fn reset(&mut self, applied: Option<u64>) {
        self.buf.clear();
        self.buf.resize(RECORD_HEADER_LEN, 0);
        self.op_count = 0;
        self.flags = 0;
        if let Some(a) = applied {
            self.flags |= FLAG_APPLIED;
            self.buf.extend_from_slice(&a.to_le_bytes());
        }
    }

    /// The encoded size a put of these lengths adds.
    pub fn op_len(key_len: usize, value_len: usize) -> u64 {
        (OP_HEADER_LEN + key_len) as u64 + value_len as u64
    }

    /// Appends a put; returns the operation's offset from the record start.
    /// The caller has checked the key and value lengths.
    pub fn push_put(&mut self, key: &[u8], value: &[u8], expire_ts: u64) -> u32 {
        self.push(OpKind::Put, key, value, expire_ts)
    }

    /// Appends a delete; returns the operation's offset from the record start.
    pub fn push_delete(&mut self, key: &[u8]) -> u32 {
        self.push(OpKind::Delete, key, &[], 0)
    }

    fn push(&mut self, kind: OpKind, key: &[u8], value: &[u8], expire_ts: u64) -> u32 {
        let at = encode_op(&mut self.buf, kind, key, value, expire_ts);
        self.op_count += 1;
        at as u32
    }

    /// Number of operations pushed.
    pub fn op_count(&self) -> u32 {
        self.op_count
    }

    /// The record's bytes so far (the header is filled in by `stamp`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Whole record length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no operation was pushed.
    pub fn is_empty(&self) -> bool {
        self.op_count == 0
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - RECORD_HEADER_LEN
    }

    /// Fills in the header for a record starting at logical position `start`,
    /// with `synced_position` known durable; returns the record's change
    /// number (its end position) and its bytes.
    pub fn stamp(&mut self, start: u64, synced_position: u64) -> (u64, &[u8]) {
        let change_number = start + self.buf.len() as u64;
        let payload_crc = super::crc32(&self.buf[RECORD_HEADER_LEN..]);
        let payload_len = self.payload_len() as u32;
        let h = &mut self.buf[..RECORD_HEADER_LEN];
        LE::write_u32(&mut h[PAYLOAD_LEN..], payload_len);
        LE::write_u32(&mut h[PAYLOAD_CRC..], payload_crc);
        h[KIND] = RecordKind::Batch as u8;
        h[FLAGS] = self.flags;
        LE::write_u16(&mut h[RESERVED16..], 0);
        LE::write_u32(&mut h[OP_COUNT..], self.op_count);
        LE::write_u32(&mut h[RESERVED32..], 0);
        LE::write_u64(&mut h[CHANGE_NUMBER..], change_number);
        LE::write_u64(&mut h[SYNCED..], synced_position.min(change_number));
        let crc = super::crc32(&h[PAYLOAD_LEN..]);
        LE::write_u32(&mut h[HDR_CRC..], crc);
        (change_number, &self.buf)
    }
}

/// Builds one merged record: operations copied whole (their own checksum
/// included) from older records, each with its original change number.
#[derive(Clone, Debug)]
pub struct MergedBuilder {
    buf: Vec<u8>,
    op_count: u32,
    highest: u64,
}

impl Default for MergedBuilder {
    fn default() -> Self {
        MergedBuilder {
            buf: vec![0; RECORD_HEADER_LEN],
            op_count: 0,
            highest: 0,
        }
    }
}

impl MergedBuilder {
    /// Appends the encoded operation `op` (as [`decode_op`] accepts it) with
    /// its change number; returns the operation's offset from the record
    /// start. The caller passes bytes that decoded, and `change_number > 0`.
    pub fn push(&mut self, change_number: u64, op: &[u8]) -> u32 {
        debug_assert!(change_number > 0 && decode_op(op).is_ok());
        self.buf.extend_from_slice(&change_number.to_le_bytes());
        let at = self.buf.len();
        self.buf.extend_from_slice(op);
        self.op_count += 1;
        self.highest = self.highest.max(change_number);
        at as u32
    }

    /// Appends a delete of `key` with `change_number` (a tombstone a merge
    /// writes in place of an expired put that may hide older values);
    /// returns the operation's offset from the record start.
    pub fn push_delete(&mut self, change_number: u64, key: &[u8]) -> u32 {
        debug_assert!(change_number > 0);
        self.buf.extend_from_slice(&change_number.to_le_bytes());
        let at = encode_op(&mut self.buf, OpKind::Delete, key, &[], 0);
        self.op_count += 1;
        self.highest = self.highest.max(change_number);
        at as u32
    }

    /// The encoded size an operation of `op_len` bytes adds.
    pub const fn entry_len(op_len: usize) -> usize {
        MERGED_CN_LEN + op_len
    }

    /// Whole record length in bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no operation was pushed.
    pub fn is_empty(&self) -> bool {
        self.op_count == 0
    }

    /// Fills in the header and returns the record's bytes; then call
    /// [`clear`](Self::clear) to build the next one.
    pub fn finish(&mut self) -> &[u8] {
        let payload_crc = super::crc32(&self.buf[RECORD_HEADER_LEN..]);
        let payload_len = (self.buf.len() - RECORD_HEADER_LEN) as u32;
        let h = &mut self.buf[..RECORD_HEADER_LEN];
        h.fill(0);
        LE::write_u32(&mut h[PAYLOAD_LEN..], payload_len);
        LE::write_u32(&mut h[PAYLOAD_CRC..], payload_crc);
        h[KIND] = RecordKind::Merged as u8;
        LE::write_u32(&mut h[OP_COUNT..], self.op_count);
        LE::write_u64(&mut h[CHANGE_NUMBER..], self.highest);
        let crc = super::crc32(&h[PAYLOAD_LEN..]);
        LE::write_u32(&mut h[HDR_CRC..], crc);
        &self.buf
    }

    /// Empties the builder for the next record.
    pub fn clear(&mut self) {
        self.buf.truncate(RECORD_HEADER_LEN);
        self.op_count = 0;
        self.highest = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = RecordBuilder::new(None);
        assert_eq!(b.push_put(b"k1", b"v", 9), 40);
        assert_eq!(b.push_delete(b"k2"), 63);
        b.stamp(100, 50).1.to_vec()
    }

    #[test]
    fn record_encodes_to_the_documented_golden_bytes() {
        let mut put = vec![0, 0, 0, 0, 1, 0, 2, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0];
        put.extend_from_slice(b"k1v");
        let c = crc32fast::hash(&put[4..]);
        put[..4].copy_from_slice(&c.to_le_bytes());
        let mut del = vec![0, 0, 0, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        del.extend_from_slice(b"k2");
        let c = crc32fast::hash(&del[4..]);
        del[..4].copy_from_slice(&c.to_le_bytes());
        let payload = [put, del].concat();
        let total = (RECORD_HEADER_LEN + payload.len()) as u64;
        let mut h = vec![0u8; 4];
        h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        h.extend_from_slice(&[1, 0, 0, 0]); // kind Batch, flags, reserved
        h.extend_from_slice(&2u32.to_le_bytes()); // op count
        h.extend_from_slice(&[0, 0, 0, 0]); // reserved
        h.extend_from_slice(&(100 + total).to_le_bytes()); // change number
        h.extend_from_slice(&50u64.to_le_bytes()); // synced position
        let c = crc32fast::hash(&h[4..]);
        h[..4].copy_from_slice(&c.to_le_bytes());
        assert_eq!(sample(), [h, payload].concat());
        assert_eq!(RECORD_HEADER_LEN, 40);
        assert_eq!(OP_HEADER_LEN, 20);
    }

    #[test]
    fn record_round_trips_with_its_operations_and_offsets() {
        let bytes = sample();
        let r = decode_record(&bytes).unwrap();
        assert_eq!(r.header.op_count, 2);
        assert_eq!(r.header.change_number, 100 + bytes.len() as u64);
        assert_eq!(r.applied, None);
        let ops: Vec<_> = r.ops().collect();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].0, 40);
        assert_eq!(ops[0].1.key, b"k1");
        assert_eq!(ops[0].1.value, b"v");
        assert_eq!(ops[0].1.expire_ts, 9);
        assert_eq!(ops[1].1.kind, OpKind::Delete);
        let (op, len) = decode_op(&bytes[63..]).unwrap();
        assert_eq!((op.key, len), (&b"k2"[..], 22));
    }

    #[test]
    fn applied_number_round_trips() {
        let mut b = RecordBuilder::new(Some(77));
        b.push_put(b"k", b"", 0);
        let bytes = b.stamp(0, 0).1.to_vec();
        let r = decode_record(&bytes).unwrap();
        assert_eq!(r.applied, Some(77));
        assert_eq!(r.ops().next().unwrap().1.value, b"");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(decode_record(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = sample();
        for bit in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&c).is_err(), "bit {bit} undetected");
        }
    }

    #[test]
    fn zeros_never_decode_as_a_record() {
        assert!(decode_record(&[0u8; 128]).is_err());
        assert!(decode_header(&[0u8; RECORD_HEADER_LEN]).is_err());
    }

    fn merged_sample() -> Vec<u8> {
        let log = sample();
        let r = decode_record(&log).unwrap();
        let mut m = MergedBuilder::default();
        for (at, _, op) in r.entries() {
            let len = OP_HEADER_LEN + op.key.len() + op.value.len();
            let cn = if op.kind == OpKind::Put { 7 } else { 300 };
            m.push(cn, &log[at as usize..at as usize + len]);
        }
        m.finish().to_vec()
    }

    #[test]
    fn merged_record_encodes_to_the_documented_golden_bytes() {
        let log = sample();
        let payload = [
            &7u64.to_le_bytes()[..],
            &log[40..63],
            &300u64.to_le_bytes()[..],
            &log[63..],
        ]
        .concat();
        let mut h = vec![0u8; 4];
        h.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        h.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        h.extend_from_slice(&[2, 0, 0, 0]); // kind Merged, no flags
        h.extend_from_slice(&2u32.to_le_bytes()); // op count
        h.extend_from_slice(&[0, 0, 0, 0]); // reserved
        h.extend_from_slice(&300u64.to_le_bytes()); // highest change number
        h.extend_from_slice(&0u64.to_le_bytes()); // no synced position
        let c = crc32fast::hash(&h[4..]);
        h[..4].copy_from_slice(&c.to_le_bytes());
        assert_eq!(merged_sample(), [h, payload].concat());
    }

    #[test]
    fn merged_record_round_trips_with_each_operations_change_number() {
        let bytes = merged_sample();
        let r = decode_record(&bytes).unwrap();
        assert_eq!(r.header.kind, RecordKind::Merged);
        let e: Vec<_> = r.entries().map(|(at, cn, op)| (at, cn, op.key)).collect();
        assert_eq!(e, vec![(48, 7, &b"k1"[..]), (79, 300, &b"k2"[..])]);
        // A point read decodes the operation at its offset as in a log.
        assert_eq!(decode_op(&bytes[48..]).unwrap().0.value, b"v");
    }

    #[test]
    fn merged_record_truncations_and_bit_flips_are_detected() {
        let bytes = merged_sample();
        for len in 0..bytes.len() {
            assert!(decode_record(&bytes[..len]).is_err(), "len {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut c = bytes.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&c).is_err(), "bit {bit} undetected");
        }
    }
}
