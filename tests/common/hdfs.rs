//! The real HDFS of the tests: a NameNode and a DataNode of Hadoop 3.4 on 127.0.0.1, started by
//! `scripts/test` with `scripts/hdfs`, which exports `FMSFLOW_HDFS_URL` and the `CLASSPATH` of
//! the Hadoop client jars.

use std::sync::Arc;

use fmsflow::lake::Storage;

/// The NameNode's URL (`hdfs://127.0.0.1:PORT`); fails saying how to start one when unset.
pub fn url() -> String {
    std::env::var("FMSFLOW_HDFS_URL").unwrap_or_else(|_| {
        panic!(
            "FMSFLOW_HDFS_URL is not set: run the tests with `bash scripts/test`, which starts a real HDFS \
             (scripts/hdfs start), builds fmsflow with the hdfs feature and exports the client's CLASSPATH"
        )
    })
}

/// A lake URL of its own on the test HDFS (unique per run), and its storage.
pub fn lake(name: &str) -> (String, Arc<dyn Storage>) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let url = format!("{}/tests/{name}-{nanos}", url());
    let storage = fmsflow::lake::open(&url, &Default::default()).unwrap_or_else(|e| panic!("opening {url}: {e}"));
    (url, storage)
}

/// Copies every table file of the lake at `url` (on HDFS) into `dir`, for DuckDB and pyarrow
/// to read (pyarrow's HDFS filesystem needs a libhdfs.so from a Hadoop install).
pub fn fetch(url: &str, dir: &std::path::Path) {
    let storage = fmsflow::lake::open(url, &Default::default()).unwrap_or_else(|e| panic!("opening {url}: {e}"));
    for table in ["readings", "hourly", "quality", "rejects"] {
        for k in storage.list(table).unwrap() {
            let path = dir.join(&k);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, storage.get(&k).unwrap().unwrap()).unwrap();
        }
    }
}
