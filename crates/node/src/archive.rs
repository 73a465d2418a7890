//! The continuous archive: the leader uploads committed log entries in sealed chunks to a
//! directory or an S3-compatible bucket (`--archive URL`), and `server restore --from-archive`
//! rebuilds a cluster from them up to any archived index or time.
//!
//! # Layout
//! Under the URL's prefix:
//!
//! | object                          | what                                                   |
//! | ------------------------------- | ------------------------------------------------------ |
//! | `archive.json`                     | [`Identity`]: the cluster name, its CA certificate  |
//! | `base/{index}-{unix_ms}-{sig}.ccb` | a backup file (`backup.rs` format) cut at `index`   |
//! | `chunks/{first}-{last}.ccar`       | entries `first..=last`, [`encode_chunk`]'s format   |
//!
//! Indexes are zero-padded to 20 digits and times to 13, so names sort in index order.
//!
//! # Authenticity
//! Whoever can write to the bucket must not be able to add to the history a restore brings
//! back. Every chunk and base is signed with the cluster CA's key (which every member holds)
//! over its SHA-256 (a base: its trailer's): a chunk carries its signature at its end, a base in
//! its name (`sig`, hex),
//! so a base and its signature appear in one write. A reader checks both against the CA
//! certificate in `archive.json`, whose fingerprint `restore --expect-ca` can pin, since a
//! bucket writer could replace the whole archive with one signed by a CA of their own.
//!
//! # Who uploads, and resuming
//! Only the leader uploads. When a node becomes leader it reads `archive.json` (writing it if
//! the archive is new; another cluster's archive is refused), lists the archive and resumes at
//! one past the highest archived index: entries are immutable once committed, so a resumed
//! upload has no gap, and a chunk a deposed leader was still uploading holds the same entries
//! as the new leader's (restore reads each index once). An empty archive, or one whose next
//! index the local log has already purged, gets a new base: a backup of the applied state,
//! after which chunks continue from its index.
//!
//! # Secrets
//! Chunks hold chat commands as the log has them, except the join secret: a `SetJoinSecret`
//! entry is archived as [`ArchivedPayload::Redacted`]. Bases are backups, which hold no
//! secret. Message bodies of end-to-end encrypted channels stay ciphertext.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chat_sm::{ApplyEntry, ApplyPayload, ChatState, Command, RaftMeta};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use openraft::{EntryPayload, ServerState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::backup::{self, BackupError, Restored};
use crate::log_store::LogStore;
use crate::raft::Raft;
use crate::state_machine::StateMachine;
use crate::types::{Entry, NodeId};

/// The identity object's name.
const IDENTITY: &str = "archive.json";
/// Largest `archive.json` a reader accepts; checked before reading it.
const IDENTITY_MAX: u64 = 64 * 1024;
/// The identity format this release writes and reads.
pub const IDENTITY_FORMAT: u8 = 2;
/// Chunk file magic number.
pub const CHUNK_MAGIC: &[u8; 8] = b"CCARCHNK";
/// Chunk format version.
pub const CHUNK_VERSION: u8 = 2;
/// A chunk holds at most this many entries...
pub const CHUNK_ENTRIES_MAX: u64 = 20_000;
/// ...and about this many bytes of encoded entries (at least one entry).
pub const CHUNK_BYTES_MAX: usize = 8 << 20;
/// Largest chunk header a reader accepts; checked before allocating.
const CHUNK_HEADER_MAX: u32 = 64 * 1024;
/// Largest chunk a reader accepts: one entry past the byte budget (a log entry is bounded by
/// the RPC frame) plus framing.
const CHUNK_OBJECT_MAX: u64 = 64 << 20;
/// A leader re-reads the archive's identity this often.
const IDENTITY_RECHECK: Duration = Duration::from_secs(60);
/// Chunks uploaded per leader tick at most, so a long backlog is worked off in steps that
/// each notice a lost leadership.
const CHUNKS_PER_TICK: usize = 16;

// ---------------------------------------------------------------------------------------------
// Errors.

const NO_BUCKET: &str = "the bucket does not exist";

/// What a store error most likely means. S3 servers name the cause in an error code inside the
/// response body, which object_store keeps only as text, so the codes are matched there.
pub fn store_meaning(error: &object_store::Error) -> &'static str {
    let mut text = error.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(inner) = cause {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return "the disk is full";
            }
        }
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    let has = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
    if has(&[
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    ]) || matches!(error, object_store::Error::Unauthenticated { .. })
    {
        "the store refused the credentials (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    } else if has(&["AccessDenied"])
        || matches!(error, object_store::Error::PermissionDenied { .. })
    {
        "the credentials are not allowed to do this"
    } else if has(&["NoSuchBucket"]) {
        NO_BUCKET
    } else if has(&["No space left on device", "QuotaExceeded"]) {
        "the disk is full"
    } else if has(&["Connection refused", "error sending request", "dns error"]) {
        "the endpoint cannot be reached"
    } else if matches!(error, object_store::Error::NotFound { .. }) {
        "the object does not exist"
    } else {
        "the store failed"
    }
}

/// Why the archive cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The `--archive` URL is not one this release reads.
    #[error("archive URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The store refused or failed a request (unreachable endpoint, bad credentials, missing
    /// bucket, full disk).
    #[error("archive {archive}: {op} {object}: {meaning} ({detail})")]
    Store {
        /// The archive, as the operator named it.
        archive: String,
        /// What was being done.
        op: &'static str,
        /// The object.
        object: String,
        /// What the failure most likely means, in the operator's terms ([`store_meaning`]).
        meaning: &'static str,
        /// The store's own message, kept as text so a report prints it once.
        detail: String,
    },
    /// An object is damaged, cut short or not what its name says.
    #[error("archive {archive}: {object} is damaged: {reason}")]
    Corrupt {
        /// The archive.
        archive: String,
        /// The object.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// Replaying archived entries into the scratch state failed (a full disk).
    #[error("archive {archive}: replaying up to index {index} failed: {reason}")]
    Replay {
        /// The archive.
        archive: String,
        /// The last entry of the failed batch.
        index: u64,
        /// The chat state's error.
        reason: String,
    },
    /// The archive was signed by another CA than the one `--expect-ca` names.
    #[error(
        "archive {archive} is signed by CA {found}, not the {expected} you expect: it is \
         another cluster's archive, or someone with access to the bucket replaced it"
    )]
    UntrustedCa {
        /// The archive.
        archive: String,
        /// The fingerprint in `archive.json`.
        found: String,
        /// The fingerprint the operator expects.
        expected: String,
    },
    /// The archive holds no `archive.json`: it is empty or not a cellchat archive.
    #[error("archive {archive}: no {IDENTITY}: not a cellchat archive (or an empty one)")]
    NotAnArchive {
        /// The archive.
        archive: String,
    },
    /// The archive belongs to another cluster identity.
    #[error(
        "archive {archive} belongs to cluster {found_cluster:?} (CA {found_ca}), not this \
         cluster {cluster:?} (CA {ca}); give each cluster its own archive URL"
    )]
    Foreign {
        /// The archive.
        archive: String,
        /// The cluster it names.
        found_cluster: String,
        /// Its CA fingerprint.
        found_ca: String,
        /// This cluster.
        cluster: String,
        /// This cluster's CA fingerprint.
        ca: String,
    },
    /// The point asked for cannot be rebuilt from what the archive holds.
    #[error("archive {archive}: {reason}")]
    Unrestorable {
        /// The archive.
        archive: String,
        /// Why, naming the indexes the archive does cover.
        reason: String,
    },
    /// Cutting or restoring a base failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// A local file or directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Opening a store.

/// Where the archive is: `--archive`, and for S3 the endpoint and region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveConfig {
    /// `file:///absolute/dir` or `s3://bucket[/prefix]`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); AWS's when absent.
    pub endpoint: Option<String>,
    /// The S3 region; `AWS_REGION`/`AWS_DEFAULT_REGION` or `us-east-1` when absent.
    pub region: Option<String>,
}

/// An opened archive: a store and the prefix everything lives under.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// The URL, for messages.
    name: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({})", self.name)
    }
}

impl Archive {
    /// Opens the archive `config` names. A directory is created if missing; S3 credentials
    /// come from the usual `AWS_*` environment variables. Nothing is read yet.
    ///
    /// # Errors
    /// [`ArchiveError::Url`] for a URL of another scheme, a relative directory, or an S3
    /// configuration the store refuses.
    pub fn open(config: &ArchiveConfig) -> Result<Archive, ArchiveError> {
        let url = config.url.as_str();
        let bad = |reason: &str| ArchiveError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if config.endpoint.is_some() {
                return Err(bad("an endpoint is only for s3:// archives"));
            }
            let dir = Path::new(dir);
            if !dir.is_absolute() {
                return Err(bad(
                    "a file:// archive needs an absolute path: file:///srv/archive",
                ));
            }
            fs::create_dir_all(dir)
                .map_err(|e| bad(&format!("cannot create the directory: {e}")))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| bad(&e.to_string()))?;
            return Ok(Archive {
                store: Arc::new(store),
                prefix: ObjectPath::default(),
                name: url.to_owned(),
            });
        }
        // reqwest's rustls has no provider of its own: the one the rest of the node uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("give file:///absolute/dir or s3://bucket/prefix"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        let region = config
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
        };
        let options = object_store::ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(20));
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(endpoint) = &config.endpoint {
            // A private endpoint is addressed by path (`endpoint/bucket/key`), as moto, MinIO
            // and Garage expect; plain http is allowed only when the operator wrote it.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder.build().map_err(|e| bad(&e.to_string()))?;
        let prefix = ObjectPath::parse(prefix.trim_matches('/'))
            .map_err(|e| bad(&format!("prefix: {e}")))?;
        let name = match &config.endpoint {
            Some(endpoint) => format!("{url} at {endpoint}"),
            None => url.to_owned(),
        };
        Ok(Archive {
            store: Arc::new(store),
            prefix,
            name,
        })
    }

    fn path(&self, rest: &str) -> ObjectPath {
        rest.split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn store_err(
        &self,
        op: &'static str,
        object: &ObjectPath,
    ) -> impl FnOnce(object_store::Error) -> ArchiveError + '_ {
        let object = object.to_string();
        move |source| ArchiveError::Store {
            archive: self.name.clone(),
            op,
            object,
            meaning: store_meaning(&source),
            detail: source.to_string(),
        }
    }

    fn corrupt(&self, object: &ObjectPath, reason: impl Into<String>) -> ArchiveError {
        ArchiveError::Corrupt {
            archive: self.name.clone(),
            object: object.to_string(),
            reason: reason.into(),
        }
    }

    async fn get(&self, object: &ObjectPath, max: u64) -> Result<bytes::Bytes, ArchiveError> {
        let got = self
            .store
            .get(object)
            .await
            .map_err(self.store_err("read", object))?;
        if got.meta.size > max {
            return Err(self.corrupt(object, format!("{} bytes, more than {max}", got.meta.size)));
        }
        got.bytes().await.map_err(self.store_err("read", object))
    }

    /// Reads the identity; `None` when the archive has none yet.
    ///
    /// # Errors
    /// The store fails, or the object is damaged.
    pub async fn identity(&self) -> Result<Option<Identity>, ArchiveError> {
        let object = self.path(IDENTITY);
        match self.store.get(&object).await {
            Ok(got) => {
                if got.meta.size > IDENTITY_MAX {
                    return Err(self.corrupt(
                        &object,
                        format!("{} bytes, more than {IDENTITY_MAX}", got.meta.size),
                    ));
                }
                let bytes = got.bytes().await.map_err(self.store_err("read", &object))?;
                let identity: Identity = serde_json::from_slice(&bytes)
                    .map_err(|e| self.corrupt(&object, e.to_string()))?;
                if identity.format != IDENTITY_FORMAT {
                    return Err(self.corrupt(
                        &object,
                        format!(
                            "format {}; this release reads format {IDENTITY_FORMAT}",
                            identity.format
                        ),
                    ));
                }
                identity
                    .verifier()
                    .map_err(|reason| self.corrupt(&object, reason))?;
                Ok(Some(identity))
            }
            // A missing bucket answers "not found" too; it is an error, not an empty archive.
            Err(e @ object_store::Error::NotFound { .. }) if store_meaning(&e) != NO_BUCKET => {
                Ok(None)
            }
            Err(e) => Err(self.store_err("read", &object)(e)),
        }
    }

    /// The checker of this archive's signatures, from its identity.
    ///
    /// # Errors
    /// The archive has no identity, or the store fails.
    pub async fn verifier(&self) -> Result<Verifier, ArchiveError> {
        let identity = self
            .identity()
            .await?
            .ok_or_else(|| ArchiveError::NotAnArchive {
                archive: self.name.clone(),
            })?;
        identity
            .verifier()
            .map_err(|reason| self.corrupt(&self.path(IDENTITY), reason))
    }

    /// Makes sure the archive belongs to `ours`, claiming an archive that has no identity yet.
    ///
    /// # Errors
    /// [`ArchiveError::Foreign`] for another cluster's archive; the store fails.
    pub async fn claim(&self, ours: &Identity) -> Result<(), ArchiveError> {
        let found = match self.identity().await? {
            Some(found) => found,
            None => {
                let object = self.path(IDENTITY);
                let bytes = serde_json::to_vec_pretty(ours).expect("serializes");
                // Create-only: of two clusters claiming one new archive, one wins and the
                // other reads the winner's identity below.
                match self
                    .store
                    .put_opts(
                        &object,
                        PutPayload::from(bytes),
                        object_store::PutMode::Create.into(),
                    )
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(object_store::Error::AlreadyExists { .. }) => {}
                    // Stores without conditional writes (some S3 clones) say so; the race is
                    // then only between clusters that share an archive at their first start.
                    Err(object_store::Error::NotImplemented { .. }) => {
                        let bytes = serde_json::to_vec_pretty(ours).expect("serializes");
                        self.store
                            .put(&object, PutPayload::from(bytes))
                            .await
                            .map_err(self.store_err("write", &object))?;
                        return Ok(());
                    }
                    Err(e) => return Err(self.store_err("write", &object)(e)),
                }
                self.identity()
                    .await?
                    .ok_or_else(|| self.corrupt(&object, "vanished after a create conflict"))?
            }
        };
        if found.cluster != ours.cluster || found.ca != ours.ca {
            return Err(ArchiveError::Foreign {
                archive: self.name.clone(),
                found_cluster: found.cluster,
                found_ca: found.ca,
                cluster: ours.cluster.clone(),
                ca: ours.ca.clone(),
            });
        }
        Ok(())
    }

    /// Lists the bases and chunks. Objects with other names are ignored.
    ///
    /// # Errors
    /// The store fails.
    pub async fn list(&self) -> Result<Listing, ArchiveError> {
        let mut listing = Listing::default();
        self.list_into(&mut listing, "base", None).await?;
        self.list_into(&mut listing, "chunks", None).await?;
        listing.bases.sort_by_key(|b| (b.index, b.created_ms));
        listing.chunks.sort_by_key(|c| (c.first, c.last));
        Ok(listing)
    }

    /// Adds the bases (`dir` "base") or chunks ("chunks") to `listing`, those named after
    /// `offset` only when it is given.
    async fn list_into(
        &self,
        listing: &mut Listing,
        dir: &str,
        offset: Option<&ObjectPath>,
    ) -> Result<(), ArchiveError> {
        let is_base = dir == "base";
        let under = self.path(dir);
        {
            let mut objects = match offset {
                Some(offset) => self.store.list_with_offset(Some(&under), offset),
                None => self.store.list(Some(&under)),
            };
            while let Some(meta) = objects.next().await {
                let meta = meta.map_err(self.store_err("list", &under))?;
                let Some(file) = meta.location.filename() else {
                    continue;
                };
                if is_base {
                    if let Some((index, created_ms, signature)) = parse_base_name(file) {
                        listing.bases.push(BaseRef {
                            index,
                            created_ms,
                            bytes: meta.size,
                            object: meta.location.clone(),
                            signature,
                        });
                    }
                } else if let Some((first, last)) = parse_chunk_name(file) {
                    listing.chunks.push(ChunkRef {
                        first,
                        last,
                        object: meta.location.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Lists every base, and only the chunks that may end after the latest base: what a
    /// leader needs to resume, in one listing request or a few however long the archive is.
    /// A chunk holds at most [`CHUNK_ENTRIES_MAX`] entries, so one ending after index `b`
    /// starts after `b - CHUNK_ENTRIES_MAX`, and names sort by first index.
    ///
    /// # Errors
    /// The store fails.
    pub async fn list_since_latest_base(&self) -> Result<Listing, ArchiveError> {
        let mut listing = Listing::default();
        self.list_into(&mut listing, "base", None).await?;
        let Some(latest) = listing.bases.iter().map(|b| b.index).max() else {
            return Ok(listing);
        };
        let from = latest.saturating_sub(CHUNK_ENTRIES_MAX);
        let offset = self.path(&format!("chunks/{from:020}"));
        self.list_into(&mut listing, "chunks", Some(&offset))
            .await?;
        listing.bases.sort_by_key(|b| (b.index, b.created_ms));
        listing.chunks.sort_by_key(|c| (c.first, c.last));
        Ok(listing)
    }

    /// Uploads a sealed chunk.
    async fn put_chunk(&self, chunk: &[u8], first: u64, last: u64) -> Result<(), ArchiveError> {
        let object = self.path(&format!("chunks/{}", chunk_name(first, last)));
        self.store
            .put(&object, PutPayload::from(chunk.to_vec()))
            .await
            .map_err(self.store_err("write", &object))?;
        Ok(())
    }

    /// Uploads the backup file at `file` as the base at `index`, in parts, under a name that
    /// carries its `signature`.
    async fn put_base(
        &self,
        file: &Path,
        index: u64,
        created_ms: u64,
        signature: &[u8],
    ) -> Result<ObjectPath, ArchiveError> {
        let object = self.path(&format!("base/{}", base_name(index, created_ms, signature)));
        let mut input = tokio::fs::File::open(file)
            .await
            .map_err(io_err("open", file))?;
        let mut upload = object_store::buffered::BufWriter::new(self.store.clone(), object.clone());
        let copied = tokio::io::copy(&mut input, &mut upload).await;
        let closed = match copied {
            Ok(_) => upload.shutdown().await,
            Err(e) => {
                let _ = upload.abort().await;
                Err(e)
            }
        };
        closed.map_err(|e| {
            self.store_err("write", &object)(object_store::Error::Generic {
                store: "archive",
                source: Box::new(e),
            })
        })?;
        Ok(object)
    }

    /// Reads and checks a chunk: its checksum, its signature under `verifier`, and that it
    /// holds exactly the entries its name says.
    ///
    /// # Errors
    /// The store fails; the chunk is damaged, not signed by the archive's CA, or holds other
    /// entries than its name says.
    pub async fn read_chunk(
        &self,
        chunk: &ChunkRef,
        verifier: &Verifier,
    ) -> Result<Vec<ArchivedEntry>, ArchiveError> {
        Ok(self.read_chunk_with_header(chunk, verifier).await?.1)
    }

    /// [`Archive::read_chunk`], with the chunk's header.
    ///
    /// # Errors
    /// As [`Archive::read_chunk`].
    pub async fn read_chunk_with_header(
        &self,
        chunk: &ChunkRef,
        verifier: &Verifier,
    ) -> Result<(ChunkHeader, Vec<ArchivedEntry>), ArchiveError> {
        let bytes = self.get(&chunk.object, CHUNK_OBJECT_MAX).await?;
        let (header, entries) =
            decode_chunk(&bytes, verifier).map_err(|reason| self.corrupt(&chunk.object, reason))?;
        if (header.first, header.last) != (chunk.first, chunk.last) {
            return Err(self.corrupt(
                &chunk.object,
                format!(
                    "it holds entries {}..={}, its name says {}..={}",
                    header.first, header.last, chunk.first, chunk.last
                ),
            ));
        }
        Ok((header, entries))
    }

    /// Downloads a base to `file`. Its signature is checked once the file is verified, by
    /// the restore that loads it.
    async fn get_base(&self, base: &BaseRef, file: &Path) -> Result<(), ArchiveError> {
        let got = self
            .store
            .get(&base.object)
            .await
            .map_err(self.store_err("read", &base.object))?;
        let mut out = tokio::fs::File::create(file)
            .await
            .map_err(io_err("create", file))?;
        let mut stream = got.into_stream();
        while let Some(part) = stream.next().await {
            let part = part.map_err(self.store_err("read", &base.object))?;
            out.write_all(&part).await.map_err(io_err("write", file))?;
        }
        out.sync_all().await.map_err(io_err("fsync", file))?;
        Ok(())
    }
}

/// What `archive.json` says: whose archive this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// [`IDENTITY_FORMAT`].
    pub format: u8,
    /// The cluster name.
    pub cluster: String,
    /// The cluster CA's fingerprint: a restored cluster (a new CA) never writes into the
    /// archive it came from, whose later indexes would clash with its own.
    pub ca: String,
    /// The CA certificate (DER, hex), whose key signs every chunk and base.
    pub ca_cert: String,
    /// When the first leader claimed it, in ms since the epoch.
    pub created_unix_ms: u64,
}

impl Identity {
    /// The identity of the cluster whose CA is `ca`.
    pub fn of(cluster: &str, ca: &crate::pki::ClusterCa, now_ms: u64) -> Identity {
        Identity {
            format: IDENTITY_FORMAT,
            cluster: cluster.to_owned(),
            ca: ca.fingerprint().to_string(),
            ca_cert: hex::encode(ca.cert()),
            created_unix_ms: now_ms,
        }
    }

    /// A checker of this archive's signatures.
    ///
    /// # Errors
    /// The certificate is not hex, or its fingerprint is not `ca`.
    pub fn verifier(&self) -> Result<Verifier, String> {
        let der = hex::decode(&self.ca_cert).map_err(|e| format!("ca_cert: {e}"))?;
        let found = proto::tls::Fingerprint::of(&der).to_string();
        if found != self.ca {
            return Err(format!(
                "its CA certificate has fingerprint {found}, not the {} it names",
                self.ca
            ));
        }
        Ok(Verifier {
            cert: rustls::pki_types::CertificateDer::from(der),
        })
    }
}

/// What a chunk's signature covers, before its SHA-256: the domain keeps a chunk's signature
/// from being taken for a base's, or for anything else the CA key signs.
const CHUNK_DOMAIN: &[u8] = b"cellchat archive chunk v2\0";
/// The same for a base.
const BASE_DOMAIN: &[u8] = b"cellchat archive base v2\0";
/// Why an object is refused when its signature does not check.
const NOT_SIGNED: &str = "its signature is not the archive CA's: it was not written by the \
                          cluster, or it was changed";
/// Largest signature accepted (an ECDSA P-256 signature in DER is at most 72 bytes).
const SIGNATURE_MAX: usize = 128;

/// Signs archive objects with the cluster CA's key.
pub struct Signer(rcgen::KeyPair);

impl Signer {
    /// A signer with `ca`'s key.
    ///
    /// # Errors
    /// The key does not load (a broken crypto library).
    pub fn new(ca: &crate::pki::ClusterCa) -> Result<Signer, String> {
        rcgen::KeyPair::from_pem(&ca.key_pem())
            .map(Signer)
            .map_err(|e| format!("loading the CA key: {e}"))
    }

    fn sign(&self, domain: &[u8], digest: &[u8; 32]) -> Vec<u8> {
        use rcgen::SigningKey as _;
        self.0
            .sign(&[domain, digest].concat())
            .expect("ECDSA signing does not fail")
    }
}

/// Checks archive objects' signatures against the CA certificate in `archive.json`.
pub struct Verifier {
    cert: rustls::pki_types::CertificateDer<'static>,
}

impl Verifier {
    fn verifies(&self, domain: &[u8], digest: &[u8; 32], signature: &[u8]) -> bool {
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.cert) else {
            return false;
        };
        cert.verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            &[domain, digest].concat(),
            signature,
        )
        .is_ok()
    }
}

fn base_name(index: u64, created_ms: u64, signature: &[u8]) -> String {
    format!(
        "{index:020}-{created_ms:013}-{}.ccb",
        hex::encode(signature)
    )
}

fn chunk_name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}.ccar")
}

fn parse_pair(name: &str, ext: &str) -> Option<(u64, u64)> {
    let (a, b) = name.strip_suffix(ext)?.split_once('-')?;
    if a.is_empty() || b.is_empty() || !a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn parse_base_name(name: &str) -> Option<(u64, u64, Vec<u8>)> {
    let (pair, signature) = name.strip_suffix(".ccb")?.rsplit_once('-')?;
    let signature = hex::decode(signature).ok()?;
    if signature.is_empty() || signature.len() > SIGNATURE_MAX {
        return None;
    }
    let (index, created_ms) = parse_pair(&format!("{pair}.ccb"), ".ccb")?;
    Some((index, created_ms, signature))
}

fn parse_chunk_name(name: &str) -> Option<(u64, u64)> {
    parse_pair(name, ".ccar").filter(|(first, last)| first <= last)
}

/// A base in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    /// The index it was cut at.
    pub index: u64,
    /// When, in ms since the epoch (every entry it holds was committed before).
    pub created_ms: u64,
    /// Its size.
    pub bytes: u64,
    /// The object.
    pub object: ObjectPath,
    /// The CA's signature over its SHA-256, from its name.
    pub signature: Vec<u8>,
}

/// A chunk in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Its first index.
    pub first: u64,
    /// Its last index.
    pub last: u64,
    /// The object.
    pub object: ObjectPath,
}

/// What an archive holds, sorted by index.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// The bases.
    pub bases: Vec<BaseRef>,
    /// The chunks.
    pub chunks: Vec<ChunkRef>,
}

impl Listing {
    /// The highest index any base or chunk reaches.
    pub fn end(&self) -> Option<u64> {
        let chunks = self.chunks.iter().map(|c| c.last);
        self.bases.iter().map(|b| b.index).chain(chunks).max()
    }

    /// The index ranges a restore can reach: from each base, on through the chunks that
    /// continue it without a gap. Sorted, merged.
    pub fn restorable(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for base in &self.bases {
            let reach = self.reach_from(base.index);
            ranges.push((base.index, reach));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (from, to) in ranges {
            match merged.last_mut() {
                Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        merged
    }

    /// The highest index the chunks reach from `index` without a gap.
    fn reach_from(&self, index: u64) -> u64 {
        let mut covered = index;
        for chunk in &self.chunks {
            if chunk.first > covered.saturating_add(1) {
                break;
            }
            covered = covered.max(chunk.last);
        }
        covered
    }
}

// ---------------------------------------------------------------------------------------------
// Chunks.

/// One archived log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEntry {
    /// Its log index.
    pub index: u64,
    /// The term of the leader that wrote it.
    pub term: u64,
    /// What it holds.
    pub payload: ArchivedPayload,
}

/// What an archived entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchivedPayload {
    /// A leader's blank entry.
    Blank,
    /// A membership change (the restored cluster has its own).
    Membership,
    /// A chat command.
    Command(Command),
    /// A command left out because it carries a secret (the join secret).
    Redacted,
}

impl ArchivedEntry {
    fn of(entry: &Entry) -> ArchivedEntry {
        let payload = match &entry.payload {
            EntryPayload::Blank => ArchivedPayload::Blank,
            EntryPayload::Membership(_) => ArchivedPayload::Membership,
            EntryPayload::Normal(command) => match &**command {
                Command::SetJoinSecret(_) => ArchivedPayload::Redacted,
                command => ArchivedPayload::Command(command.clone()),
            },
        };
        ArchivedEntry {
            index: entry.log_id.index,
            term: entry.log_id.leader_id.term,
            payload,
        }
    }

    /// The leader's clock this entry carries: its messages' times, or an expiry's.
    pub fn at_ms(&self) -> Option<u64> {
        match &self.payload {
            ArchivedPayload::Command(Command::Send(send)) => Some(send.at_ms),
            ArchivedPayload::Command(Command::SendBatch(sends)) => {
                sends.iter().map(|s| s.at_ms).max()
            }
            ArchivedPayload::Command(Command::Expire { at_ms }) => Some(*at_ms),
            _ => None,
        }
    }
}

/// What a chunk says about itself, in JSON after its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The cluster.
    pub cluster: String,
    /// First and last index.
    pub first: u64,
    /// Last index.
    pub last: u64,
    /// When it was sealed, in ms since the epoch.
    pub sealed_unix_ms: u64,
    /// The node that sealed it.
    pub node: NodeId,
}

/// Encodes a chunk. All integers little-endian:
///
/// | field      | width | meaning                                               |
/// | ---------- | ----- | ----------------------------------------------------- |
/// | magic      | 8     | [`CHUNK_MAGIC`] `"CCARCHNK"`                          |
/// | version    | 1     | [`CHUNK_VERSION`]                                     |
/// | header_len | 4     | at most 64 KiB                                        |
/// | header     | var   | [`ChunkHeader`] as JSON                               |
/// | body_len   | 8     |                                                       |
/// | body       | var   | postcard `Vec<ArchivedEntry>`, indexes first..=last   |
/// | sha256     | 32    | SHA-256 of every byte before it                       |
/// | signature  | var   | the CA's ECDSA P-256 signature over the SHA-256 (DER) |
/// | sig_len    | 2     | the signature's length                                |
fn encode_chunk(header: &ChunkHeader, entries: &[ArchivedEntry], signer: &Signer) -> Vec<u8> {
    let head = serde_json::to_vec(header).expect("serializes");
    let body = postcard::to_stdvec(entries).expect("serializes");
    let mut out = Vec::with_capacity(head.len() + body.len() + 64);
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&u32::try_from(head.len()).expect("small").to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&sum);
    let signature = signer.sign(CHUNK_DOMAIN, &sum);
    out.extend_from_slice(&signature);
    out.extend_from_slice(&u16::try_from(signature.len()).expect("small").to_le_bytes());
    out
}

/// Decodes and checks a chunk: checksum, signature, framing, and entries exactly
/// `first..=last`.
fn decode_chunk(
    bytes: &[u8],
    verifier: &Verifier,
) -> Result<(ChunkHeader, Vec<ArchivedEntry>), String> {
    if bytes.len() < 8 + 1 + 4 + 8 + 32 + 2 || &bytes[..8] != CHUNK_MAGIC {
        return Err("not a cellchat archive chunk (no magic)".into());
    }
    if bytes[8] != CHUNK_VERSION {
        return Err(format!(
            "chunk format {}; this release reads format {CHUNK_VERSION}",
            bytes[8]
        ));
    }
    let (rest, sig_len) = bytes.split_at(bytes.len() - 2);
    let sig_len = usize::from(u16::from_le_bytes(sig_len.try_into().expect("2 bytes")));
    if sig_len > SIGNATURE_MAX || rest.len() < 8 + 1 + 4 + 8 + 32 + sig_len {
        return Err(format!("signature length {sig_len} does not fit"));
    }
    let (rest, signature) = rest.split_at(rest.len() - sig_len);
    let (content, sum) = rest.split_at(rest.len() - 32);
    let actual: [u8; 32] = Sha256::digest(content).into();
    if actual != sum {
        return Err(format!(
            "SHA-256 mismatch over its {} bytes: damaged or cut short",
            content.len()
        ));
    }
    if !verifier.verifies(CHUNK_DOMAIN, &actual, signature) {
        return Err(NOT_SIGNED.into());
    }
    let head_len = u32::from_le_bytes(content[9..13].try_into().expect("4 bytes"));
    if head_len > CHUNK_HEADER_MAX || 13 + head_len as usize + 8 > content.len() {
        return Err(format!("header length {head_len} does not fit"));
    }
    let head_end = 13 + head_len as usize;
    let header: ChunkHeader =
        serde_json::from_slice(&content[13..head_end]).map_err(|e| format!("header: {e}"))?;
    let body_len = u64::from_le_bytes(content[head_end..head_end + 8].try_into().expect("8"));
    let body = &content[head_end + 8..];
    if body_len != body.len() as u64 {
        return Err(format!(
            "body length {body_len}, {} bytes present",
            body.len()
        ));
    }
    let entries: Vec<ArchivedEntry> =
        postcard::from_bytes(body).map_err(|e| format!("entries: {e}"))?;
    let expected = header.last.checked_sub(header.first).map(|n| n + 1);
    if expected != Some(entries.len() as u64)
        || entries
            .iter()
            .enumerate()
            .any(|(i, e)| e.index != header.first + i as u64)
    {
        return Err(format!(
            "its entries are not exactly {}..={}",
            header.first, header.last
        ));
    }
    Ok((header, entries))
}

// ---------------------------------------------------------------------------------------------
// The leader's uploader.

/// Where a leader's uploads stand.
#[derive(Default)]
struct Progress {
    /// `None` until resumed, then the next index to upload (`Some(None)`: no base yet).
    next: Option<Option<u64>>,
    /// The latest base known: its index and when it was cut, in ms since the epoch.
    last_base: Option<(u64, u64)>,
}

/// Everything the uploader needs from its node.
pub struct Uploader {
    /// The archive.
    pub archive: Archive,
    /// Whose archive it must be.
    pub identity: Identity,
    /// The cluster CA's key, which signs every chunk and base.
    pub signer: Signer,
    /// This node, for chunk headers and bases.
    pub node: (NodeId, String),
    /// The node's Raft, to know when it leads.
    pub raft: Raft,
    /// A reader of the node's log.
    pub log: LogStore,
    /// The node's state, for bases.
    pub state: StateMachine,
    /// How often the leader seals what was committed since the last chunk.
    pub interval: Duration,
    /// How often the leader cuts a new base, so that a restore of the latest state reads only
    /// the chunks since the last base, and a leader resuming lists only those.
    pub base_interval: Duration,
    /// Where bases are written before upload.
    pub scratch: PathBuf,
    /// The archived index, for metrics: the highest index uploaded by this node.
    pub archived: Arc<std::sync::atomic::AtomicU64>,
}

impl Uploader {
    /// Uploads while this node leads; runs until the node stops. Errors are logged and retried
    /// at the next tick from a fresh listing.
    pub async fn run(self) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = Progress::default();
        let mut failing = false;
        let mut checked = tokio::time::Instant::now();
        loop {
            ticks.tick().await;
            if crate::raft::metrics_now(&self.raft).state != ServerState::Leader {
                progress.next = None;
                continue;
            }
            if progress.next.is_some() && checked.elapsed() >= IDENTITY_RECHECK {
                // An archive replaced or emptied under a long-lived leader is noticed: without
                // its identity the next step resumes from a fresh listing.
                checked = tokio::time::Instant::now();
                match self.archive.identity().await {
                    Ok(Some(found))
                        if found.cluster == self.identity.cluster
                            && found.ca == self.identity.ca => {}
                    Ok(_) => progress.next = None,
                    Err(e) => tracing::debug!(error = %e, "archive identity check failed"),
                }
            }
            match self.step(&mut progress).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(archive = %self.archive.name, "archive uploads resumed");
                        failing = false;
                    }
                }
                Err(e) => {
                    // The next tick starts from a fresh listing: what was uploaded is what
                    // counts, whatever this node believed.
                    progress.next = None;
                    if !failing {
                        tracing::warn!(error = %e, "archive upload failed; retrying every tick");
                    } else {
                        tracing::debug!(error = %e, "archive upload failed again");
                    }
                    failing = true;
                }
            }
        }
    }

    /// One tick: resume if needed, then upload up to [`CHUNKS_PER_TICK`] chunks of what is
    /// applied here, or a base; once caught up, a base when the last one is
    /// [`Uploader::base_interval`] old.
    async fn step(&self, progress: &mut Progress) -> Result<(), ArchiveError> {
        let next = &mut progress.next;
        let mut at = match *next {
            Some(at) => at,
            None => {
                self.archive.claim(&self.identity).await?;
                let listing = self.archive.list_since_latest_base().await?;
                progress.last_base = listing
                    .bases
                    .iter()
                    .map(|b| (b.index, b.created_ms))
                    .max_by_key(|&(_, ms)| ms);
                // Chunks without a base restore nothing: an archive that lost its bases (an
                // operator emptied it) starts again from a new one.
                let at = match listing.bases.is_empty() {
                    true => None,
                    false => listing.end().map(|end| end + 1),
                };
                tracing::info!(archive = %self.archive.name, next = ?at, "archive: leading, resuming");
                *next = Some(at);
                at
            }
        };
        for _ in 0..CHUNKS_PER_TICK {
            let applied = self.state.chat().applied_index().map_or(0, |i| i.0);
            let Some(from) = at else {
                let (index, created_ms) = self.put_base().await?;
                progress.last_base = Some((index, created_ms));
                at = Some(index + 1);
                *next = Some(at);
                continue;
            };
            if from > applied {
                // An idle cluster gets no new base: the last one still holds its state.
                let due = progress.last_base.is_none_or(|(index, ms)| {
                    applied > index
                        && crate::api::now_ms().saturating_sub(ms)
                            >= self.base_interval.as_millis() as u64
                });
                if due {
                    // Chunks go on from `from`, not from the new base: entries applied while it
                    // was cut stay in the chunks that continue the older bases.
                    progress.last_base = Some(self.put_base().await?);
                }
                return Ok(());
            }
            let end = applied.min(from + CHUNK_ENTRIES_MAX - 1) + 1;
            let log = self.log.clone();
            let entries =
                tokio::task::spawn_blocking(move || log.read_range(from, end, CHUNK_BYTES_MAX))
                    .await
                    .map_err(|e| io_error("reading the log", e))?
                    .map_err(|e| ArchiveError::Io {
                        op: "read the raft log in",
                        path: self.scratch.clone(),
                        source: e,
                    })?;
            if entries.first().map(|e| e.log_id.index) != Some(from) {
                // The log no longer has `from`: a base carries the state over the hole.
                tracing::warn!(
                    next = from,
                    "archive: the log was purged past the archive; writing a new base"
                );
                let (index, created_ms) = self.put_base().await?;
                progress.last_base = Some((index, created_ms));
                at = Some(index + 1);
                *next = Some(at);
                continue;
            }
            let archived: Vec<ArchivedEntry> = entries.iter().map(ArchivedEntry::of).collect();
            let last = from + archived.len() as u64 - 1;
            let header = ChunkHeader {
                cluster: self.identity.cluster.clone(),
                first: from,
                last,
                sealed_unix_ms: crate::api::now_ms(),
                node: self.node.0,
            };
            let bytes = encode_chunk(&header, &archived, &self.signer);
            self.archive.put_chunk(&bytes, from, last).await?;
            self.archived
                .fetch_max(last, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(
                first = from,
                last,
                bytes = bytes.len(),
                "archive: chunk sealed"
            );
            at = Some(last + 1);
            *next = Some(at);
        }
        Ok(())
    }

    /// Cuts a backup of the applied state and uploads it as a base; returns its index and
    /// creation time.
    async fn put_base(&self) -> Result<(u64, u64), ArchiveError> {
        fs::create_dir_all(&self.scratch).map_err(io_err("create", &self.scratch))?;
        let file = self.scratch.join("base.ccb");
        let (state, target) = (self.state.clone(), file.clone());
        let source = (
            self.node.0,
            self.node.1.clone(),
            self.identity.cluster.clone(),
        );
        let verified = backup::in_background("archive-base", move || {
            backup::write_backup_file(state.chat(), &target, source)
        })
        .await
        .map_err(|e| ArchiveError::Io {
            op: "cut a base in",
            path: self.scratch.clone(),
            source: e,
        })??;
        let index = verified.manifest.applied_index;
        // The trailer's SHA-256 covers every byte before it and the trailer holds it: signing
        // it binds the whole file, with no second read.
        let signature = self.signer.sign(BASE_DOMAIN, &verified.sha256);
        let object = self
            .archive
            .put_base(&file, index, verified.manifest.created_unix_ms, &signature)
            .await;
        let _ = fs::remove_file(&file);
        let object = object?;
        self.archived
            .fetch_max(index, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(index, %object, bytes = verified.bytes, "archive: base uploaded");
        Ok((index, verified.manifest.created_unix_ms))
    }
}

fn io_error(what: &str, e: tokio::task::JoinError) -> ArchiveError {
    ArchiveError::Io {
        op: "run a task",
        path: PathBuf::from(what),
        source: io::Error::other(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Restore.

/// How far `restore --from-archive` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Everything archived.
    End,
    /// Through this log index.
    Index(u64),
    /// Every entry up to the first one stamped after this time (ms since the epoch).
    Time(u64),
}

impl std::str::FromStr for Until {
    type Err = String;

    /// A log index (digits), or an RFC 3339 time (`2026-12-04T10:00:00Z`).
    fn from_str(s: &str) -> Result<Until, String> {
        if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
            return s
                .parse()
                .map(Until::Index)
                .map_err(|e| format!("index {s}: {e}"));
        }
        let time = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
            format!("{s:?} is neither a log index nor an RFC 3339 time (2026-12-04T10:00:00Z): {e}")
        })?;
        u64::try_from(time.timestamp_millis())
            .map(Until::Time)
            .map_err(|_| format!("{s}: before 1970"))
    }
}

/// Which base and chunks rebuild a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The base to start from.
    pub base: BaseRef,
    /// The chunks to replay, in order, each past the one before.
    pub chunks: Vec<ChunkRef>,
}

/// Picks the base and chunks that reach `until`.
///
/// # Errors
/// [`ArchiveError::Unrestorable`] naming what the archive can restore instead.
pub fn plan(archive: &str, listing: &Listing, until: Until) -> Result<Plan, ArchiveError> {
    let refuse = |reason: String| ArchiveError::Unrestorable {
        archive: archive.to_owned(),
        reason,
    };
    let ranges = || {
        let r = listing.restorable();
        if r.is_empty() {
            "it holds no base yet".to_owned()
        } else {
            let r: Vec<String> = r.iter().map(|(a, b)| format!("{a}..={b}")).collect();
            format!("it can restore indexes {}", r.join(", "))
        }
    };
    let base = match until {
        Until::End => listing
            .bases
            .iter()
            .max_by_key(|b| (listing.reach_from(b.index), b.index)),
        Until::Index(i) => listing.bases.iter().rev().find(|b| b.index <= i),
        Until::Time(t) => listing.bases.iter().rev().find(|b| b.created_ms <= t),
    };
    let Some(base) = base.cloned() else {
        return Err(refuse(match until {
            Until::Time(t) => format!(
                "no base was cut at or before {} ({}); {}",
                t,
                format_ms(t),
                ranges()
            ),
            _ => format!("no base at or below the point asked for; {}", ranges()),
        }));
    };
    let reach = listing.reach_from(base.index);
    if let Until::Index(i) = until {
        if i > reach {
            return Err(refuse(format!(
                "index {i} is past what the base at {} reaches ({reach}); {}",
                base.index,
                ranges()
            )));
        }
    }
    let stop = match until {
        Until::Index(i) => i,
        _ => reach,
    };
    let mut covered = base.index;
    let mut chunks = Vec::new();
    for chunk in &listing.chunks {
        if covered >= stop {
            break;
        }
        if chunk.last <= covered {
            continue;
        }
        if chunk.first > covered + 1 {
            break;
        }
        covered = chunk.last;
        chunks.push(chunk.clone());
    }
    Ok(Plan { base, chunks })
}

fn format_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}

/// What [`restore`] made.
#[derive(Debug)]
pub struct ArchiveRestored {
    /// The fingerprint of the CA that signed everything restored.
    pub ca: String,
    /// The base it started from.
    pub base_index: u64,
    /// Chunks read.
    pub chunks: usize,
    /// Entries applied on top of the base.
    pub replayed: u64,
    /// The restored state's index.
    pub index: u64,
    /// The latest leader time among the replayed entries.
    pub last_at_ms: Option<u64>,
    /// The new cluster, as `backup::restore` made it.
    pub restored: Restored,
}

/// Rebuilds the state at `until` from the archive and restores it into `target` as the first
/// node of a new cluster, like `backup::restore`. Works in a scratch directory next to
/// `target`; on any error nothing is left at `target`. With `expect_ca`, the archive must be
/// the cluster's whose CA has that fingerprint.
///
/// # Errors
/// The archive is unreachable, not an archive, damaged, or cannot reach `until`; the target
/// is not empty; a local file fails.
pub async fn restore(
    archive: &Archive,
    until: Until,
    target: &Path,
    name: Option<&str>,
    expect_ca: Option<&str>,
) -> Result<ArchiveRestored, ArchiveError> {
    let identity = archive
        .identity()
        .await?
        .ok_or_else(|| ArchiveError::NotAnArchive {
            archive: archive.name.clone(),
        })?;
    if let Some(expected) = expect_ca {
        if !expected.trim().eq_ignore_ascii_case(&identity.ca) {
            return Err(ArchiveError::UntrustedCa {
                archive: archive.name.clone(),
                found: identity.ca,
                expected: expected.trim().to_owned(),
            });
        }
    }
    let listing = archive.list().await?;
    let plan = plan(&archive.name, &listing, until)?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Some(name) = name {
        crate::validate_name(name)
            .map_err(|e| ArchiveError::Backup(BackupError::DataDir(e.into())))?;
    }
    if fs::read_dir(target).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::TargetNotEmpty {
            path: target.to_path_buf(),
        }
        .into());
    }
    fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
    let scratch = parent.join(format!(
        ".{}.from-archive-{}",
        target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("restore"),
        std::process::id()
    ));
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(io_err("remove", &scratch))?;
    }
    fs::create_dir_all(&scratch).map_err(io_err("create", &scratch))?;
    let result = rebuild(archive, &identity, &plan, until, &scratch, target, name).await;
    if let Err(e) = fs::remove_dir_all(&scratch) {
        tracing::warn!(dir = %scratch.display(), error = %e, "cannot remove the scratch dir");
    }
    result
}

async fn rebuild(
    archive: &Archive,
    identity: &Identity,
    plan: &Plan,
    until: Until,
    scratch: &Path,
    target: &Path,
    name: Option<&str>,
) -> Result<ArchiveRestored, ArchiveError> {
    let base_file = scratch.join("base.ccb");
    let verifier = identity
        .verifier()
        .map_err(|reason| archive.corrupt(&archive.path(IDENTITY), reason))?;
    archive.get_base(&plan.base, &base_file).await?;
    let state = StateMachine::open(&scratch.join("sm"))
        .map_err(io_err("open the chat state in", scratch))?;
    // Verified first (the reader is built for hostile files), then its signature: nothing of
    // the scratch state is used unless both hold.
    let base = backup::load_backup(&base_file, &state)?;
    if !verifier.verifies(BASE_DOMAIN, &base.sha256, &plan.base.signature) {
        return Err(archive.corrupt(&plan.base.object, NOT_SIGNED));
    }
    if base.manifest.applied_index != plan.base.index {
        return Err(archive.corrupt(
            &plan.base.object,
            format!(
                "it was cut at index {}, its name says {}",
                base.manifest.applied_index, plan.base.index
            ),
        ));
    }
    let _ = fs::remove_file(&base_file);
    let mut covered = plan.base.index;
    let mut replayed = 0;
    let mut last_at_ms = None;
    'chunks: for chunk in &plan.chunks {
        let entries = archive.read_chunk(chunk, &verifier).await?;
        let mut batch: Vec<&ArchivedEntry> = Vec::new();
        for entry in &entries {
            if entry.index <= covered {
                continue;
            }
            let stop = match until {
                Until::End => false,
                Until::Index(i) => entry.index > i,
                Until::Time(t) => entry.at_ms().is_some_and(|at| at > t),
            };
            if stop {
                apply(archive, state.chat(), &batch)?;
                replayed += batch.len() as u64;
                break 'chunks;
            }
            if let Some(at) = entry.at_ms() {
                last_at_ms = Some(last_at_ms.map_or(at, |l: u64| l.max(at)));
            }
            // An expiry is applied alone, as on the cluster (chat-sm's rule).
            let alone = matches!(
                entry.payload,
                ArchivedPayload::Command(Command::Expire { .. })
            );
            if alone || batch.len() >= 1000 {
                apply(archive, state.chat(), &batch)?;
                replayed += batch.len() as u64;
                batch.clear();
            }
            batch.push(entry);
            if alone {
                apply(archive, state.chat(), &batch)?;
                replayed += 1;
                batch.clear();
            }
            covered = entry.index;
        }
        apply(archive, state.chat(), &batch)?;
        replayed += batch.len() as u64;
    }
    let index = state.chat().applied_index().map_or(0, |i| i.0);
    let rebuilt = scratch.join("rebuilt.ccb");
    let source = (0, "archive".to_owned(), identity.cluster.clone());
    backup::write_backup_file(state.chat(), &rebuilt, source)?;
    drop(state);
    let restored = backup::restore(&rebuilt, target, name)?;
    Ok(ArchiveRestored {
        ca: identity.ca.clone(),
        base_index: plan.base.index,
        chunks: plan.chunks.len(),
        replayed,
        index,
        last_at_ms,
        restored,
    })
}

/// Applies archived entries to a scratch state, as one batch.
fn apply(
    archive: &Archive,
    chat: &ChatState,
    entries: &[&ArchivedEntry],
) -> Result<(), ArchiveError> {
    let Some(last) = entries.last() else {
        return Ok(());
    };
    let batch: Vec<ApplyEntry<'_>> = entries
        .iter()
        .map(|e| ApplyEntry {
            index: chat_sm::LogIndex(e.index),
            payload: match &e.payload {
                ArchivedPayload::Command(command) => ApplyPayload::Command(command),
                ArchivedPayload::Membership => ApplyPayload::Membership,
                ArchivedPayload::Blank | ArchivedPayload::Redacted => ApplyPayload::Blank,
            },
        })
        .collect();
    // The scratch state's Raft meta is never used: the rebuilt backup leaves it out.
    let meta = RaftMeta {
        last_applied: last.index.to_be_bytes().to_vec(),
        membership: None,
    };
    match chat.try_apply(&batch, meta) {
        Ok(_) => Ok(()),
        Err(e) => Err(ArchiveError::Replay {
            archive: archive.name.clone(),
            index: last.index,
            reason: e.to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Describing an archive (`server archive-info`).

/// What an archive holds, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    /// The archive.
    pub archive: String,
    /// Whose it is.
    pub identity: Option<Identity>,
    /// Bases: (index, created ms, bytes).
    pub bases: Vec<(u64, u64, u64)>,
    /// Chunks.
    pub chunks: usize,
    /// The highest archived index.
    pub last_index: Option<u64>,
    /// The index ranges a restore can reach.
    pub restorable: Vec<(u64, u64)>,
}

/// Lists an archive.
///
/// # Errors
/// The store fails or `archive.json` is damaged.
pub async fn describe(archive: &Archive) -> Result<ArchiveInfo, ArchiveError> {
    let identity = archive.identity().await?;
    let listing = archive.list().await?;
    Ok(ArchiveInfo {
        archive: archive.name.clone(),
        identity,
        bases: listing
            .bases
            .iter()
            .map(|b| (b.index, b.created_ms, b.bytes))
            .collect(),
        chunks: listing.chunks.len(),
        last_index: listing.end(),
        restorable: listing.restorable(),
    })
}

/// How long messages waited to be archived: for each message in the archive, the time its
/// chunk was sealed minus the leader's time stamped on it (about its commit time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveLag {
    /// Messages measured.
    pub messages: u64,
    /// Median lag, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Largest, ms.
    pub max_ms: u64,
}

/// Measures [`ArchiveLag`] over every chunk (reads the whole archive); `None` without messages.
///
/// # Errors
/// As [`Archive::read_chunk`].
pub async fn lag(archive: &Archive) -> Result<Option<ArchiveLag>, ArchiveError> {
    let verifier = archive.verifier().await?;
    let listing = archive.list().await?;
    let mut lags = Vec::new();
    for chunk in &listing.chunks {
        let (header, entries) = archive.read_chunk_with_header(chunk, &verifier).await?;
        for entry in &entries {
            let sends: &[chat_sm::SendCmd] = match &entry.payload {
                ArchivedPayload::Command(Command::Send(send)) => std::slice::from_ref(send),
                ArchivedPayload::Command(Command::SendBatch(sends)) => sends,
                _ => &[],
            };
            lags.extend(
                sends
                    .iter()
                    .map(|s| header.sealed_unix_ms.saturating_sub(s.at_ms)),
            );
        }
    }
    if lags.is_empty() {
        return Ok(None);
    }
    lags.sort_unstable();
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
    Ok(Some(ArchiveLag {
        messages: lags.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: *lags.last().expect("not empty"),
    }))
}

/// Chunks by index for tests and tools that check an archive's entries.
///
/// # Errors
/// As [`Archive::read_chunk`].
pub async fn read_all(archive: &Archive) -> Result<BTreeMap<u64, ArchivedEntry>, ArchiveError> {
    let verifier = archive.verifier().await?;
    let listing = archive.list().await?;
    let mut out = BTreeMap::new();
    for chunk in &listing.chunks {
        for entry in archive.read_chunk(chunk, &verifier).await? {
            out.insert(entry.index, entry);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use chat_sm::{ClientId, SendCmd};

    use super::*;

    fn send(index: u64, at_ms: u64) -> ArchivedEntry {
        ArchivedEntry {
            index,
            term: 1,
            payload: ArchivedPayload::Command(Command::Send(SendCmd {
                channel: "general".into(),
                sender: "alice".into(),
                body: format!("m{index}").into_bytes(),
                client_id: ClientId([1; 16]),
                client_seq: index,
                at_ms,
            })),
        }
    }

    fn header(first: u64, last: u64) -> ChunkHeader {
        ChunkHeader {
            cluster: "c".into(),
            first,
            last,
            sealed_unix_ms: 5,
            node: 1,
        }
    }

    /// A cluster CA's identity, signer and verifier.
    fn keys(cluster: &str) -> (Identity, Signer, Verifier) {
        let ca = crate::pki::ClusterCa::generate(cluster).unwrap();
        let identity = Identity::of(cluster, &ca, 1);
        let verifier = identity.verifier().unwrap();
        (identity, Signer::new(&ca).unwrap(), verifier)
    }

    #[test]
    fn a_chunk_round_trips_and_any_flipped_byte_is_refused() {
        let (_, signer, verifier) = keys("c");
        let entries: Vec<ArchivedEntry> = (10..=14).map(|i| send(i, 1000 + i)).collect();
        let bytes = encode_chunk(&header(10, 14), &entries, &signer);
        let (h, back) = decode_chunk(&bytes, &verifier).unwrap();
        assert_eq!((h.first, h.last), (10, 14));
        assert_eq!(back, entries);
        for at in [
            0,
            8,
            12,
            40,
            bytes.len() / 2,
            bytes.len() - 40,
            bytes.len() - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(
                decode_chunk(&bad, &verifier).is_err(),
                "a flip at {at} went unnoticed"
            );
        }
        assert!(decode_chunk(&bytes[..bytes.len() - 1], &verifier).is_err());
    }

    #[test]
    fn a_chunk_resealed_or_signed_by_another_ca_is_refused() {
        let (_, signer, verifier) = keys("c");
        let (_, forger, _) = keys("c");
        let entries: Vec<ArchivedEntry> = (1..=3).map(|i| send(i, i)).collect();
        // Signed by another CA (a bucket writer's own key).
        let forged = encode_chunk(&header(1, 3), &entries, &forger);
        let err = decode_chunk(&forged, &verifier).unwrap_err();
        assert!(err.contains("signature"), "{err}");
        // A changed entry with its SHA-256 recomputed and the old signature kept.
        let mut bytes = encode_chunk(&header(1, 3), &entries, &signer);
        let sig_len = usize::from(u16::from_le_bytes(
            bytes[bytes.len() - 2..].try_into().unwrap(),
        ));
        let content_end = bytes.len() - 2 - sig_len - 32;
        let at = bytes[..content_end]
            .windows(5)
            .position(|w| w == b"alice")
            .unwrap();
        bytes[at] = b'm';
        let sum: [u8; 32] = Sha256::digest(&bytes[..content_end]).into();
        bytes[content_end..content_end + 32].copy_from_slice(&sum);
        let err = decode_chunk(&bytes, &verifier).unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    #[test]
    fn an_identity_whose_certificate_is_not_its_fingerprint_is_refused() {
        let (mut ours, _, _) = keys("c");
        let (theirs, _, _) = keys("c");
        ours.ca_cert = theirs.ca_cert;
        let err = ours.verifier().err().unwrap();
        assert!(err.contains("fingerprint"), "{err}");
    }

    #[test]
    fn a_chunk_whose_entries_are_not_its_range_is_refused() {
        let (_, signer, verifier) = keys("c");
        let entries: Vec<ArchivedEntry> = [10, 11, 13].iter().map(|&i| send(i, i)).collect();
        let bytes = encode_chunk(&header(10, 12), &entries, &signer);
        let err = decode_chunk(&bytes, &verifier).unwrap_err();
        assert!(err.contains("not exactly 10..=12"), "{err}");
    }

    #[test]
    fn the_join_secret_never_reaches_a_chunk() {
        let entry = Entry {
            log_id: crate::archive::tests::log_id(7),
            payload: EntryPayload::Normal(
                Command::SetJoinSecret(chat_sm::JoinSecret(vec![0xAB; 32])).into(),
            ),
        };
        let archived = ArchivedEntry::of(&entry);
        assert_eq!(archived.payload, ArchivedPayload::Redacted);
        let bytes = encode_chunk(&header(7, 7), &[archived], &keys("c").1);
        assert!(!bytes.windows(32).any(|w| w == [0xAB; 32]));
    }

    fn log_id(index: u64) -> crate::types::LogId {
        crate::types::LogId::new(
            <crate::types::CommittedLeaderId as openraft::vote::RaftLeaderId>::new(3, 1),
            index,
        )
    }

    fn listing(bases: &[(u64, u64)], chunks: &[(u64, u64)]) -> Listing {
        Listing {
            bases: bases
                .iter()
                .map(|&(index, created_ms)| BaseRef {
                    index,
                    created_ms,
                    bytes: 1,
                    object: ObjectPath::from(format!(
                        "base/{}",
                        base_name(index, created_ms, &[1])
                    )),
                    signature: vec![1],
                })
                .collect(),
            chunks: chunks
                .iter()
                .map(|&(first, last)| ChunkRef {
                    first,
                    last,
                    object: ObjectPath::from(format!("chunks/{}", chunk_name(first, last))),
                })
                .collect(),
        }
    }

    fn ranges(plan: &Plan) -> Vec<(u64, u64)> {
        plan.chunks.iter().map(|c| (c.first, c.last)).collect()
    }

    #[test]
    fn names_sort_by_index_and_parse_back() {
        assert_eq!(parse_chunk_name(&chunk_name(7, 12)), Some((7, 12)));
        assert_eq!(
            parse_base_name(&base_name(3, 1_700_000_000_000, &[0xAB; 71])),
            Some((3, 1_700_000_000_000, vec![0xAB; 71]))
        );
        assert_eq!(
            parse_base_name("00000000000000000003-1700000000000.ccb"),
            None
        );
        assert!(chunk_name(9, 9) < chunk_name(10, 10));
        assert_eq!(
            parse_chunk_name("00000000000000000009-00000000000000000008.ccar"),
            None
        );
        assert_eq!(parse_chunk_name("x-1.ccar"), None);
        assert_eq!(parse_chunk_name("1-2.ccb"), None);
    }

    #[test]
    fn overlapping_chunks_of_two_leaders_are_read_once_and_resume_has_no_gap() {
        // A deposed leader's 11..=30 and the new leader's 11..=20, 21..=40.
        let l = listing(&[(10, 100)], &[(11, 20), (11, 30), (21, 40), (41, 41)]);
        assert_eq!(l.end(), Some(41));
        assert_eq!(l.restorable(), vec![(10, 41)]);
        let p = plan("a", &l, Until::End).unwrap();
        assert_eq!(p.base.index, 10);
        // 11..=20 then 11..=30 (past 20 only), 21..=40 (past 30 only), 41.
        assert_eq!(ranges(&p), vec![(11, 20), (11, 30), (21, 40), (41, 41)]);
        let p = plan("a", &l, Until::Index(25)).unwrap();
        assert_eq!(ranges(&p), vec![(11, 20), (11, 30)]);
    }

    #[test]
    fn a_gap_is_refused_naming_what_can_be_restored() {
        // The log was purged past the archive: a new base at 60 carries on after a hole.
        let l = listing(&[(10, 100), (60, 200)], &[(11, 20), (61, 70)]);
        assert_eq!(l.restorable(), vec![(10, 20), (60, 70)]);
        let err = plan("a", &l, Until::Index(40)).unwrap_err().to_string();
        assert!(
            err.contains("index 40 is past") && err.contains("10..=20, 60..=70"),
            "{err}"
        );
        assert_eq!(plan("a", &l, Until::Index(15)).unwrap().base.index, 10);
        let p = plan("a", &l, Until::End).unwrap();
        assert_eq!((p.base.index, ranges(&p)), (60, vec![(61, 70)]));
        let err = plan("a", &l, Until::Index(5)).unwrap_err().to_string();
        assert!(err.contains("no base"), "{err}");
        assert!(plan("a", &listing(&[], &[(1, 5)]), Until::End).is_err());
    }

    #[test]
    fn a_time_picks_the_last_base_cut_before_it() {
        let l = listing(&[(10, 100), (60, 200)], &[(11, 59), (61, 70)]);
        assert_eq!(plan("a", &l, Until::Time(150)).unwrap().base.index, 10);
        assert_eq!(plan("a", &l, Until::Time(200)).unwrap().base.index, 60);
        assert!(plan("a", &l, Until::Time(99)).is_err());
    }

    #[test]
    fn until_reads_an_index_or_a_time() {
        assert_eq!("42".parse::<Until>(), Ok(Until::Index(42)));
        assert_eq!(
            "2026-12-04T10:00:00Z".parse::<Until>(),
            Ok(Until::Time(1_796_378_400_000))
        );
        assert!("yesterday".parse::<Until>().is_err());
        assert!("-3".parse::<Until>().is_err());
    }

    #[test]
    fn urls_of_other_kinds_are_refused_by_name() {
        let open = |url: &str| {
            Archive::open(&ArchiveConfig {
                url: url.into(),
                ..Default::default()
            })
        };
        for url in ["http://x/y", "file://relative/dir", "s3://", "/tmp/x"] {
            let err = open(url).unwrap_err().to_string();
            assert!(err.contains(url), "{err}");
        }
    }

    #[tokio::test]
    async fn a_resume_lists_the_chunks_since_the_latest_base_and_finds_the_same_end() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(&ArchiveConfig {
            url: format!("file://{}", dir.path().display()),
            ..Default::default()
        })
        .unwrap();
        let mut names: Vec<String> = [(0, 1), (50_000, 2)]
            .iter()
            .map(|&(index, ms)| format!("base/{}", base_name(index, ms, &[7])))
            .collect();
        let chunks = [
            (1, 20_000),
            (20_001, 40_000),
            (40_001, 60_000),
            (60_001, 60_005),
        ];
        names.extend(
            chunks
                .iter()
                .map(|&(first, last)| format!("chunks/{}", chunk_name(first, last))),
        );
        for name in names {
            archive
                .store
                .put(&archive.path(&name), PutPayload::from(vec![0u8]))
                .await
                .unwrap();
        }
        let full = archive.list().await.unwrap();
        let since = archive.list_since_latest_base().await.unwrap();
        assert_eq!(since.bases, full.bases);
        assert_eq!(since.end(), full.end());
        assert_eq!(since.end(), Some(60_005));
        let listed: Vec<(u64, u64)> = since.chunks.iter().map(|c| (c.first, c.last)).collect();
        assert_eq!(listed, [(40_001, 60_000), (60_001, 60_005)]);
    }

    #[tokio::test]
    async fn a_directory_archive_is_claimed_once_and_refuses_another_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(&ArchiveConfig {
            url: format!("file://{}", dir.path().display()),
            ..Default::default()
        })
        .unwrap();
        assert!(archive.identity().await.unwrap().is_none());
        let (ours, signer, verifier) = keys("c");
        archive.claim(&ours).await.unwrap();
        archive.claim(&ours).await.unwrap();
        let (theirs, _, _) = keys("c");
        let err = archive.claim(&theirs).await.unwrap_err();
        assert!(matches!(err, ArchiveError::Foreign { .. }), "{err}");
        let entries: Vec<ArchivedEntry> = (1..=3).map(|i| send(i, i)).collect();
        archive
            .put_chunk(&encode_chunk(&header(1, 3), &entries, &signer), 1, 3)
            .await
            .unwrap();
        let l = archive.list().await.unwrap();
        assert_eq!(l.chunks.len(), 1);
        assert_eq!(
            archive.read_chunk(&l.chunks[0], &verifier).await.unwrap(),
            entries
        );
        // A chunk whose name lies about its range is refused by name.
        archive
            .put_chunk(&encode_chunk(&header(1, 3), &entries, &signer), 4, 6)
            .await
            .unwrap();
        let l = archive.list().await.unwrap();
        let err = archive
            .read_chunk(&l.chunks[1], &verifier)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("00000000000000000004-00000000000000000006.ccar"),
            "{err}"
        );
    }
}
