//! The S3 backend (`s3://bucket/prefix`), with `aws-sdk-s3`.
//!
//! - Credentials and, unless set here, the region come from the standard AWS chain
//!   (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and the shared files, web
//!   identity, the container and instance metadata services), never from fmsflow's
//!   configuration; they are never logged.
//! - An object appears whole or not at all (a `PutObject` or a completed multipart upload),
//!   so no temporary names are needed.
//! - Objects larger than the multipart threshold go up in parts (an upload that fails is
//!   aborted, so no parts are left billed).
//! - Throttling, timeouts and 5xx answers are retried by the SDK's standard retry strategy,
//!   with exponential backoff and jitter, up to [`S3Options::max_attempts`] tries. A try
//!   times out after [`S3Options::attempt_timeout`] (connecting: at most 10 s of it).

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use aws_sdk_s3::Client;

use super::{LakeError, Storage};

/// S3 settings that are not credentials (`[lake]` `s3_*` keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server (MinIO, Garage, s3s-fs, ...); `None` for AWS
    /// (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Region; `None` takes it from the AWS chain (`AWS_REGION`, the profile).
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Server-side encryption of every object: `AES256` or `aws:kms`; `None` for the bucket's
    /// default.
    pub sse: Option<String>,
    /// Objects of this many bytes or more are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part of a multipart upload (S3 needs at least 5 MiB but for the last).
    pub part_size: usize,
    /// Tries of one request, the first included, before its error is reported.
    pub max_attempts: u32,
    /// The longest one try of a request may take (connecting, sending, the whole answer):
    /// a try the server does not finish by then is retried, so a request an unresponsive
    /// server never answers cannot hang the run.
    pub attempt_timeout: std::time::Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            path_style: false,
            sse: None,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            max_attempts: 10,
            attempt_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The encryption values S3 takes, as fmsflow's configuration spells them.
pub const SSE_VALUES: [&str; 2] = ["AES256", "aws:kms"];

/// A lake under `prefix` in an S3 bucket.
pub struct S3Storage {
    client: Client,
    bucket: String,
    /// The root's key prefix, empty or ending in `/`.
    prefix: String,
    sse: Option<ServerSideEncryption>,
    multipart_threshold: usize,
    part_size: usize,
    endpoint: String,
    /// Tries of a read whose answer's body stops coming, and how long one may take: the
    /// SDK's own timeout ends with the answer's headers.
    max_attempts: u32,
    attempt_timeout: std::time::Duration,
    /// Runs the SDK's futures; callers are plain threads.
    rt: tokio::runtime::Runtime,
}

/// An S3 failure as the lake's I/O error, with the SDK's whole error chain in its text.
fn s3_error(op: &'static str, path: String, e: impl std::error::Error) -> LakeError {
    LakeError::Io {
        op,
        path,
        source: std::io::Error::other(DisplayErrorContext(e).to_string()),
    }
}

impl S3Storage {
    /// Opens `s3://{bucket}/{prefix}` and checks that the bucket answers, so a wrong
    /// endpoint, bucket or credentials fail at start with what was tried.
    pub fn open(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self, LakeError> {
        let url = format!("s3://{bucket}/{prefix}");
        let bad = |problem: String| LakeError::Url {
            url: url.clone(),
            problem,
        };
        if bucket.is_empty() {
            return Err(bad("needs a bucket, e.g. s3://my-bucket/lake".into()));
        }
        let sse = match opts.sse.as_deref() {
            None => None,
            Some(v) if SSE_VALUES.contains(&v) => Some(ServerSideEncryption::from(v)),
            Some(v) => return Err(bad(format!("s3_sse = {v:?}: use one of {SSE_VALUES:?}"))),
        };
        if opts.part_size < 5 << 20 {
            return Err(bad(format!(
                "s3_part_size = {}: S3 needs parts of at least 5 MiB (5242880 bytes)",
                opts.part_size
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("starting the S3 client's runtime: {e}")))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(opts.max_attempts.max(1)))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(opts.attempt_timeout.min(std::time::Duration::from_secs(10)))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            );
        if let Some(r) = &opts.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let shared = rt.block_on(loader.load());
        if shared.region().is_none() {
            return Err(bad(
                "no region: set lake.s3_region (FMSFLOW_LAKE__S3_REGION) or AWS_REGION".into(),
            ));
        }
        // Uploads carry a checksum the server checks. Reads are not checked against the
        // checksum the server stored: an S3-compatible server that stores an object and its
        // checksum record one after the other (s3s-fs does) leaves, when a writer dies
        // between the two, a whole object with a stale checksum, which a checked read would
        // refuse for good. What fmsflow reads is checked when it is decoded (JSON, Parquet).
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(opts.path_style)
            .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &opts.endpoint {
            conf = conf.endpoint_url(e);
        }
        let client = Client::from_conf(conf.build());
        let endpoint = opts
            .endpoint
            .clone()
            .unwrap_or_else(|| "the AWS endpoint of the region".into());
        let prefix = match prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let storage = S3Storage {
            client,
            bucket: bucket.to_string(),
            prefix,
            sse,
            multipart_threshold: opts.multipart_threshold.max(1),
            part_size: opts.part_size,
            endpoint,
            max_attempts: opts.max_attempts.max(1),
            attempt_timeout: opts.attempt_timeout,
            rt,
        };
        storage
            .rt
            .block_on(storage.client.head_bucket().bucket(bucket).send())
            .map_err(|e| {
                // HeadBucket answers have no body: tell the cases apart by status.
                let status = e.raw_response().map(|r| r.status().as_u16());
                let why = match (e.code(), status) {
                    (Some("NoSuchBucket" | "NotFound"), _) | (_, Some(404)) => {
                        "the bucket does not exist (fmsflow does not create buckets)".to_string()
                    }
                    (Some("Forbidden" | "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"), _)
                    | (_, Some(401 | 403)) => "access denied: check the credentials of the AWS chain \
                         (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the instance role) and their rights"
                        .to_string(),
                    _ => DisplayErrorContext(&e).to_string(),
                };
                bad(format!("bucket {bucket:?} at {}: {why}", storage.endpoint))
            })?;
        Ok(storage)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key.trim_start_matches('/'))
    }

    async fn put_multipart(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
        let path = || format!("s3://{}/{key}", self.bucket);
        let mut create = self.client.create_multipart_upload().bucket(&self.bucket).key(key);
        if let Some(sse) = &self.sse {
            create = create.server_side_encryption(sse.clone());
        }
        let upload = create
            .send()
            .await
            .map_err(|e| s3_error("starting a multipart upload of", path(), e))?;
        let Some(id) = upload.upload_id() else {
            return Err(s3_error(
                "starting a multipart upload of",
                path(),
                std::io::Error::other("the server returned no upload id"),
            ));
        };
        let parts = async {
            let mut done = Vec::new();
            for (i, chunk) in bytes.chunks(self.part_size).enumerate() {
                let n = i as i32 + 1;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(n)
                    .body(ByteStream::from(chunk.to_vec()))
                    .send()
                    .await
                    .map_err(|e| s3_error("uploading a part of", path(), e))?;
                done.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(done)).build())
                .send()
                .await
                .map_err(|e| s3_error("completing the multipart upload of", path(), e))
        }
        .await;
        if let Err(e) = parts {
            // Best effort: the upload's parts are billed until it is aborted.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await;
            return Err(e);
        }
        Ok(())
    }
}

impl Storage for S3Storage {
    fn put_atomic(&self, key: &str, bytes: &[u8]) -> Result<(), LakeError> {
        let full = self.key(key);
        if bytes.len() >= self.multipart_threshold {
            return self.rt.block_on(self.put_multipart(&full, bytes));
        }
        let mut put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(bytes.to_vec()));
        if let Some(sse) = &self.sse {
            put = put.server_side_encryption(sse.clone());
        }
        self.rt
            .block_on(put.send())
            .map(|_| ())
            .map_err(|e| s3_error("uploading", format!("s3://{}/{full}", self.bucket), e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
        let full = self.key(key);
        let path = || format!("s3://{}/{full}", self.bucket);
        // The SDK retries a request until its answer's headers; a body that then stops
        // coming (the connection stalls) is retried here, each read bounded.
        let mut tries = 0;
        loop {
            tries += 1;
            let got = self.rt.block_on(async {
                match self.client.get_object().bucket(&self.bucket).key(&full).send().await {
                    Ok(o) => match tokio::time::timeout(self.attempt_timeout, o.body.collect()).await {
                        Ok(Ok(body)) => Ok(Ok(Some(body.into_bytes().to_vec()))),
                        Ok(Err(e)) => Err(s3_error("reading", path(), e)),
                        Err(_) => Err(LakeError::Io {
                            op: "reading",
                            path: path(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("the object's body did not come whole within {:?}", self.attempt_timeout),
                            ),
                        }),
                    },
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(Ok(None)),
                    Err(e) => Ok(Err(s3_error("reading", path(), e))),
                }
            });
            match got {
                Ok(result) => return result,
                Err(e) if tries >= self.max_attempts => return Err(e),
                Err(_) => continue,
            }
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let dir = format!("{}/", self.key(prefix.trim_end_matches('/')));
        let path = || format!("s3://{}/{dir}", self.bucket);
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&dir)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| s3_error("listing", path(), e))?;
                for o in page.contents() {
                    if let Some(k) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        out.push(k.to_string());
                    }
                }
            }
            Ok(out)
        })
    }

    fn delete(&self, key: &str) -> Result<(), LakeError> {
        let full = self.key(key);
        self.rt
            .block_on(self.client.delete_object().bucket(&self.bucket).key(&full).send())
            .map(|_| ())
            .map_err(|e| s3_error("deleting", format!("s3://{}/{full}", self.bucket), e))
    }

    fn backend(&self) -> &'static str {
        "s3"
    }
    fn describe(&self) -> String {
        format!("S3 bucket {} under {:?} at {}", self.bucket, self.prefix, self.endpoint)
    }
}
