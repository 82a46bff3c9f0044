mod common;
use common::*;
use dkv_cask::KvStore;

#[test]
fn written_pairs_survive_reopen_across_segment_rollover() {
    let t = temp_store(test_options());
    for i in 0..3000u32 {
        t.store
            .put(&[pair(format!("key{i:05}"), vec![b'v'; 50])])
            .unwrap();
    }
    assert_eq!(value_of(&t.store, "key00042").unwrap(), vec![b'v'; 50]);
    t.store.delete(b"key00042").unwrap();
    t.store.close().unwrap();
    let s = reopen(t.dir.path(), test_options());
    assert_eq!(value_of(&s, "key00042"), None);
    assert_eq!(value_of(&s, "key02999").unwrap(), vec![b'v'; 50]);
    assert_eq!(all_pairs(&s).len(), 2999);
    assert!(s.recovery_report().segments > 2);
}
