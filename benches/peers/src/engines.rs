//! One adapter per engine, all behind the same small interface, so that
//! every workload drives every engine through identical calls.
//!
//! Rules every adapter follows (so that the rows compare like with like):
//! - a put is one key and one value, one call, its own transaction where
//!   the engine has transactions;
//! - a get is a standalone call that sees every write acknowledged before
//!   it, and hands the caller an owned value (redb: a read transaction per
//!   get and a copy out of its guard; fjall and sled return owned slices);
//! - a scan yields every pair as owned data;
//! - durability is chosen at open ([`Durability`]) and mapped onto each
//!   engine's own settings as [`durability_table`] writes down.
//!
//! Errors panic with the engine's message: this is a benchmark.

use std::path::Path;

/// What an acknowledged write promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// No fsync per operation: a write is acknowledged once the engine has
    /// it (in memory or in the page cache).
    None,
    /// Each acknowledged write is durable (fsynced) before the call returns.
    Sync,
}

/// The engines this binary knows (RocksDB only with the `rocksdb` feature).
pub const ALL: &[&str] = &[
    "dkv-cask",
    "redb",
    "fjall",
    "sled",
    #[cfg(feature = "rocksdb")]
    "rocksdb",
];

/// How each engine is configured for `none` and `sync`, and for compaction,
/// as the report writes it down.
pub fn durability_table() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    let mut rows = vec![
        (
            "dkv-cask",
            "`SyncMode::Never` (each put copied into the page cache through a shared map of the active segment, no system call per put, no fsync; 4 KiB values with one `pwrite` each)",
            "`SyncMode::Always` (the put returns after `fdatasync`; concurrent writers share one)",
            "`Store::merge()`; opened with `Retention` zero (no followers), automatic merge on (default)",
        ),
        (
            "redb",
            "one write transaction per put, `Durability::None`; an `Immediate` commit at the end of each fill",
            "one write transaction per put, `Durability::Immediate` (the default)",
            "`Database::compact()` (loops until it returns false)",
        ),
        (
            "fjall",
            "`Keyspace::insert` with the default journal mode (`PersistMode::Buffer`: written to the OS, no fsync)",
            "`insert` then `Database::persist(PersistMode::SyncData)` per put",
            "`rotate_memtable_and_wait()` then `major_compact()`",
        ),
        (
            "sled",
            "`Db::insert`, default config (background flush every 500 ms)",
            "`insert` then `Db::flush()` per put. **Weaker than the others**: sled 0.34 on Linux makes its log stable with `sync_file_range` (flags `WAIT_BEFORE`, `WRITE`, `WAIT_AFTER`), not `fsync`/`fdatasync`, so neither the disk's write cache nor file metadata is flushed",
            "none (sled 0.34 has no compaction call); measured again after a flush",
        ),
    ];
    if cfg!(feature = "rocksdb") {
        rows.push((
            "rocksdb",
            "`WriteOptions::set_sync(false)` (WAL written, not synced)",
            "`WriteOptions::set_sync(true)` (WAL fsynced per write)",
            "`flush()` then `compact_range(None, None)`",
        ));
    }
    rows
}

/// Whether the engine's `sync` falls short of `fsync`/`fdatasync` (so its
/// sync rows are not comparable; the report shows the ratio both ways).
pub fn weak_sync(name: &str) -> bool {
    name == "sled"
}

/// The interface every workload uses.
pub trait Engine: Send + Sync {
    /// Writes one pair.
    fn put(&self, key: &[u8], value: &[u8]);
    /// Reads one key; the length of the owned value handed back, if found.
    fn get(&self, key: &[u8]) -> Option<usize>;
    /// Reads every pair whose key starts with `prefix`, in the engine's
    /// fastest way to see each key's and value's bytes (borrowed where
    /// the engine lends them: no engine must make an owned copy); how
    /// many.
    fn scan(&self, prefix: &[u8]) -> usize;
    /// Makes everything written so far durable.
    fn sync(&self);
    /// Runs the engine's own full compaction; false when it has none.
    fn compact(&mut self) -> bool;
    /// What the engine itself reports as its data's size on disk, if
    /// anything beyond the files (dkv-cask: `stats().disk_bytes()`).
    fn reported_disk_bytes(&self) -> Option<u64> {
        None
    }
    /// Closes the engine and waits for its threads.
    fn close(self: Box<Self>);
}

/// Opens (creating if needed) the engine `name` in the folder `dir`.
pub fn open(name: &str, dir: &Path, durability: Durability) -> Box<dyn Engine> {
    std::fs::create_dir_all(dir).expect("create engine folder");
    match name {
        "dkv-cask" => Box::new(cask::Cask::open(dir, durability)),
        "redb" => Box::new(redb_engine::Redb::open(dir, durability)),
        "fjall" => Box::new(fjall_engine::Fjall::open(dir, durability)),
        "sled" => Box::new(sled_engine::Sled::open(dir, durability)),
        #[cfg(feature = "rocksdb")]
        "rocksdb" => Box::new(rocks::Rocks::open(dir, durability)),
        other => panic!("unknown engine {other:?}; known: {ALL:?}"),
    }
}

mod cask {
    use super::*;
    use dkv_cask::serverpb::KvPair;
    use dkv_cask::{IterationOptions, KvStore, Options, Retention, Store, SyncMode};

    pub struct Cask {
        store: Store,
    }

    impl Cask {
        pub fn open(dir: &Path, durability: Durability) -> Self {
            let options = Options {
                sync_mode: match durability {
                    Durability::None => SyncMode::Never,
                    Durability::Sync => SyncMode::Always,
                },
                retention: Retention {
                    bytes: 0,
                    age: std::time::Duration::ZERO,
                    honour_pins: false,
                },
                ..Options::default()
            };
            Cask {
                store: Store::open(dir, options).expect("dkv-cask open"),
            }
        }
    }

    impl Engine for Cask {
        fn put(&self, key: &[u8], value: &[u8]) {
            self.store
                .put(&[KvPair {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    expire_ts: 0,
                }])
                .expect("dkv-cask put");
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let mut found = self.store.get(&[key]).expect("dkv-cask get");
            found.pop().map(|p| p.value.len())
        }

        fn scan(&self, prefix: &[u8]) -> usize {
            let options = IterationOptions::new().with_prefix(prefix.to_vec());
            let mut n = 0;
            // Lent pairs: no allocation per pair (`iter` gives owned ones).
            self.store
                .scan(&options, |p| {
                    std::hint::black_box((p.key, p.value));
                    n += 1;
                    true
                })
                .expect("dkv-cask scan");
            n
        }

        fn sync(&self) {
            self.store.sync().expect("dkv-cask sync");
        }

        fn compact(&mut self) -> bool {
            self.store.merge().expect("dkv-cask merge");
            true
        }

        fn reported_disk_bytes(&self) -> Option<u64> {
            Some(self.store.stats().expect("dkv-cask stats").disk_bytes())
        }

        fn close(self: Box<Self>) {
            self.store.close().expect("dkv-cask close");
        }
    }
}

mod redb_engine {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

    pub struct Redb {
        db: redb::Database,
        durability: redb::Durability,
    }

    impl Redb {
        pub fn open(dir: &Path, durability: Durability) -> Self {
            let db = redb::Database::create(dir.join("data.redb")).expect("redb open");
            // Create the table so that read transactions find it.
            let tx = db.begin_write().expect("redb begin_write");
            tx.open_table(TABLE).expect("redb open_table");
            tx.commit().expect("redb commit");
            Redb {
                db,
                durability: match durability {
                    Durability::None => redb::Durability::None,
                    Durability::Sync => redb::Durability::Immediate,
                },
            }
        }
    }

    impl Engine for Redb {
        fn put(&self, key: &[u8], value: &[u8]) {
            let mut tx = self.db.begin_write().expect("redb begin_write");
            tx.set_durability(self.durability)
                .expect("redb set_durability");
            {
                let mut table = tx.open_table(TABLE).expect("redb open_table");
                table.insert(key, value).expect("redb insert");
            }
            tx.commit().expect("redb commit");
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let tx = self.db.begin_read().expect("redb begin_read");
            let table = tx.open_table(TABLE).expect("redb open_table");
            let found = table.get(key).expect("redb get");
            found.map(|v| std::hint::black_box(v.value().to_vec()).len())
        }

        fn scan(&self, prefix: &[u8]) -> usize {
            let tx = self.db.begin_read().expect("redb begin_read");
            let table = tx.open_table(TABLE).expect("redb open_table");
            let mut n = 0;
            for item in table.range(prefix..).expect("redb range") {
                let (k, v) = item.expect("redb scan");
                if !k.value().starts_with(prefix) {
                    break;
                }
                // Borrowed from the page: no copy.
                std::hint::black_box((k.value(), v.value()));
                n += 1;
            }
            n
        }

        fn sync(&self) {
            // A durable commit makes every earlier non-durable one durable.
            let mut tx = self.db.begin_write().expect("redb begin_write");
            tx.set_durability(redb::Durability::Immediate)
                .expect("redb set_durability");
            tx.commit().expect("redb commit");
        }

        fn compact(&mut self) -> bool {
            while self.db.compact().expect("redb compact") {}
            true
        }

        fn close(self: Box<Self>) {
            self.db.close().expect("redb close");
        }
    }
}

mod fjall_engine {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct Fjall {
        db: Database,
        keyspace: Keyspace,
        sync: bool,
    }

    impl Fjall {
        pub fn open(dir: &Path, durability: Durability) -> Self {
            // 1 GiB block cache, as redb's and sled's defaults.
            let db = Database::builder(dir)
                .cache_size(1 << 30)
                .open()
                .expect("fjall open");
            let keyspace = db
                .keyspace("kv", KeyspaceCreateOptions::default)
                .expect("fjall keyspace");
            Fjall {
                db,
                keyspace,
                sync: durability == Durability::Sync,
            }
        }
    }

    impl Engine for Fjall {
        fn put(&self, key: &[u8], value: &[u8]) {
            self.keyspace.insert(key, value).expect("fjall insert");
            if self.sync {
                self.db
                    .persist(PersistMode::SyncData)
                    .expect("fjall persist");
            }
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let found = self.keyspace.get(key).expect("fjall get");
            found.map(|v| std::hint::black_box(v).len())
        }

        fn scan(&self, prefix: &[u8]) -> usize {
            let mut n = 0;
            for guard in self.keyspace.prefix(prefix) {
                std::hint::black_box(guard.into_inner().expect("fjall scan"));
                n += 1;
            }
            n
        }

        fn sync(&self) {
            self.db
                .persist(PersistMode::SyncAll)
                .expect("fjall persist");
        }

        fn compact(&mut self) -> bool {
            self.keyspace
                .rotate_memtable_and_wait()
                .expect("fjall rotate memtable");
            self.keyspace
                .major_compact()
                .expect("fjall major compaction");
            true
        }

        fn close(self: Box<Self>) {
            self.db
                .persist(PersistMode::SyncAll)
                .expect("fjall persist");
            let Fjall { db, keyspace, .. } = *self;
            drop(keyspace);
            drop(db); // waits for the background threads
        }
    }
}

mod sled_engine {
    use super::*;

    pub struct Sled {
        db: sled::Db,
        sync: bool,
    }

    impl Sled {
        pub fn open(dir: &Path, durability: Durability) -> Self {
            Sled {
                db: sled::Config::new().path(dir).open().expect("sled open"),
                sync: durability == Durability::Sync,
            }
        }
    }

    impl Engine for Sled {
        fn put(&self, key: &[u8], value: &[u8]) {
            self.db.insert(key, value).expect("sled insert");
            if self.sync {
                self.db.flush().expect("sled flush");
            }
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let found = self.db.get(key).expect("sled get");
            found.map(|v| std::hint::black_box(v).len())
        }

        fn scan(&self, prefix: &[u8]) -> usize {
            let mut n = 0;
            for item in self.db.scan_prefix(prefix) {
                std::hint::black_box(item.expect("sled scan"));
                n += 1;
            }
            n
        }

        fn sync(&self) {
            self.db.flush().expect("sled flush");
        }

        fn compact(&mut self) -> bool {
            self.db.flush().expect("sled flush");
            false
        }

        fn close(self: Box<Self>) {
            self.db.flush().expect("sled flush");
        }
    }
}

#[cfg(feature = "rocksdb")]
mod rocks {
    use super::*;
    use rocksdb::{BlockBasedOptions, Cache, DB, Options, WriteOptions};

    pub struct Rocks {
        db: DB,
        write: WriteOptions,
    }

    impl Rocks {
        pub fn open(dir: &Path, durability: Durability) -> Self {
            let mut options = Options::default();
            options.create_if_missing(true);
            options.increase_parallelism(2);
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            table.set_block_cache(&Cache::new_lru_cache(1 << 30));
            options.set_block_based_table_factory(&table);
            let mut write = WriteOptions::default();
            write.set_sync(durability == Durability::Sync);
            Rocks {
                db: DB::open(&options, dir).expect("rocksdb open"),
                write,
            }
        }
    }

    impl Engine for Rocks {
        fn put(&self, key: &[u8], value: &[u8]) {
            self.db
                .put_opt(key, value, &self.write)
                .expect("rocksdb put");
        }

        fn get(&self, key: &[u8]) -> Option<usize> {
            let found = self.db.get(key).expect("rocksdb get");
            found.map(|v| std::hint::black_box(v).len())
        }

        fn scan(&self, prefix: &[u8]) -> usize {
            // The raw iterator lends each key and value (`iterator()` would
            // copy both into boxes).
            let mut n = 0;
            let mut it = self.db.raw_iterator();
            it.seek(prefix);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(prefix) {
                    break;
                }
                std::hint::black_box((k, v));
                n += 1;
                it.next();
            }
            it.status().expect("rocksdb scan");
            n
        }

        fn sync(&self) {
            self.db.flush_wal(true).expect("rocksdb flush_wal");
        }

        fn compact(&mut self) -> bool {
            self.db.flush().expect("rocksdb flush");
            self.db.compact_range::<&[u8], &[u8]>(None, None);
            true
        }

        fn close(self: Box<Self>) {
            self.db.flush_wal(true).expect("rocksdb flush_wal");
        }
    }
}
