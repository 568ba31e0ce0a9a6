//! The real S3 server of the tests: s3s-fs on 127.0.0.1, started by `scripts/test` with
//! `scripts/s3`, which exports `AWS_ENDPOINT_URL` and the test keys.

use fmsflow::lake::s3::S3Options;

/// The server's endpoint; fails saying how to start one when it is not set.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL is not set: run the tests with `bash scripts/test`, which starts a real S3 \
             server (scripts/s3 start) and exports its settings"
        )
    })
}

/// Options for the test server: its endpoint, path-style addressing, region us-east-1.
pub fn options() -> S3Options {
    S3Options {
        endpoint: Some(endpoint()),
        region: Some("us-east-1".into()),
        path_style: true,
        ..S3Options::default()
    }
}

/// Creates a bucket of its own for a test (unique per run) and returns its name.
pub fn bucket(name: &str) -> String {
    bucket_at(&endpoint(), name)
}

/// [`bucket`] on the server at `endpoint`.
pub fn bucket_at(endpoint: &str, name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!("{name}-{nanos}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .endpoint_url(endpoint)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "creating bucket {bucket}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                )
            });
    });
    bucket
}
