//! DKV's wire types: field names, numbers and types match
//! `github.com/flipkart-incubator/dkv/pkg/serverpb`, so bytes encoded by
//! DKV's Go code decode here and back. Each expected encoding below is
//! written out by hand from the proto3 wire format (tag = field << 3 | wire
//! type; 2 = length-delimited, 0 = varint).

use dkv_cask::serverpb::trxn_record::TrxnType;
use dkv_cask::serverpb::{ChangeRecord, CompareAndSetRequest, IterateRequest, KvPair, TrxnRecord};
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M, expected: &[u8]) {
    assert_eq!(m.encode_to_vec(), expected, "encoding of {m:?}");
    assert_eq!(&M::decode(expected).expect("decode"), m);
}

#[test]
fn kv_pair_uses_dkv_field_numbers() {
    let m = KvPair {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        expire_ts: 300,
    };
    // key = 1 (bytes), value = 2 (bytes), expireTS = 3 (uint64 varint 300 = ac 02)
    round_trip(&m, &[0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 0xac, 0x02]);
}

#[test]
fn compare_and_set_request_uses_dkv_field_numbers() {
    let m = CompareAndSetRequest {
        key: b"k".to_vec(),
        old_value: b"o".to_vec(),
        new_value: b"n".to_vec(),
        expire_ts: 1,
    };
    round_trip(&m, &[0x0a, 1, b'k', 0x12, 1, b'o', 0x1a, 1, b'n', 0x20, 1]);
}

#[test]
fn iterate_request_uses_dkv_field_numbers() {
    let m = IterateRequest {
        key_prefix: b"p".to_vec(),
        start_key: b"s".to_vec(),
    };
    round_trip(&m, &[0x0a, 1, b'p', 0x12, 1, b's']);
}

#[test]
fn change_record_and_trxn_record_use_dkv_field_numbers() {
    let m = ChangeRecord {
        serialised_form: vec![0xff],
        change_number: 2,
        number_of_trxns: 1,
        trxns: vec![TrxnRecord {
            r#type: TrxnType::Delete as i32,
            key: b"k".to_vec(),
            value: Vec::new(),
            expire_ts: 0,
        }],
    };
    // serialisedForm = 1, changeNumber = 2, numberOfTrxns = 3,
    // trxns = 4 (embedded: type = 1 varint 2, key = 2)
    round_trip(
        &m,
        &[
            0x0a, 1, 0xff, 0x10, 2, 0x18, 1, 0x22, 5, 0x08, 2, 0x12, 1, b'k',
        ],
    );
}

#[test]
fn trxn_types_have_dkv_values() {
    assert_eq!(TrxnType::Unknown as i32, 0);
    assert_eq!(TrxnType::Put as i32, 1);
    assert_eq!(TrxnType::Delete as i32, 2);
    assert_eq!(TrxnType::Delete.as_str_name(), "Delete");
}

#[test]
fn unknown_fields_from_a_newer_peer_are_skipped() {
    // KVPair with an extra field 9 (varint) that this build does not know.
    let bytes = [0x0a, 1, b'k', 0x48, 7];
    let m = KvPair::decode(&bytes[..]).expect("decode");
    assert_eq!(m.key, b"k");
}

#[test]
fn truncated_messages_are_errors_not_panics() {
    let full = KvPair {
        key: b"key".to_vec(),
        value: b"value".to_vec(),
        expire_ts: u64::MAX,
    }
    .encode_to_vec();
    // Field boundaries (after key at 5 bytes, after value at 12) are valid
    // shorter messages; every cut inside a field is an error.
    for len in 1..full.len() {
        let decoded = KvPair::decode(&full[..len]);
        assert_eq!(
            decoded.is_ok(),
            len == 5 || len == 12,
            "prefix of {len} bytes"
        );
    }
}
