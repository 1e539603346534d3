//! The queue's contract (the `quern-conformance` library), run against SQLite
//! and PostgreSQL, each case on a fresh database file or schema.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use quern_runtime::Runtime;
use quern_store::Store;
use support::db::Db;

impl quern_conformance::Subject for Db {
    fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn execute(&self, sql: &str) -> impl Future<Output = u64> {
        Db::execute(self, sql)
    }

    fn runtime(&self) -> Arc<Runtime> {
        support::runtime()
    }

    fn component(&self, relative: &str) -> PathBuf {
        support::dist(relative)
    }

    fn cleanup(self) -> impl Future<Output = ()> {
        Db::cleanup(self)
    }
}

quern_conformance::suite!(sqlite, Db::sqlite);
quern_conformance::suite!(postgres, Db::postgres);
