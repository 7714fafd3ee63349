//! The content-addressed artifact store (default `.msmae/` beside the pipeline).
//!
//! ```text
//! objects/ab/<digest>/manifest.json   files, sizes and BLAKE3 digests of one artifact
//! objects/ab/<digest>/data/...        the artifact's files (read-only)
//! index/<key>.json                    cache key → artifact digest, key parts, run info
//! tmp/<key>.<pid>.<n>/data/           a stage's output while it runs
//! locks/<key>.lock                    held while a key is being computed
//! hashmemo.tsv                        memo of external-input file digests
//! roots/<id>                          lock files written with this store, with the
//!                                     artifacts each last referenced (for gc)
//! MSMAE_STORE                         the marker: this directory is an msmae store
//! ```
//! A directory becomes a store only when it is new or empty (or already holds a store of an
//! earlier msmae, recognised by its layout); any other directory is refused, so that a
//! mistyped `--store` never touches someone's files. Inside a store, msmae removes only
//! entries it names itself (`tmp/<key>.…`, `resume/<key>`): anything else found there is
//! reported and left alone.
//! Commit protocol: the stage writes into `tmp/…/data`; the runner checks it against the
//! stage's declaration, fsyncs and hashes every file, writes the manifest, renames the whole
//! staging directory to `objects/…` (atomic; an existing identical object wins), and only
//! then writes the index entry (temp file + fsync + rename). A process killed at any point
//! leaves either no index entry or one pointing at a complete object.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use msmae_core::OutputDecl;

use crate::error::{Error, Result};
use crate::hashing::{self, HashMemo};
use crate::key::KeyParts;

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// The listing of an artifact; its digest is the artifact's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub digest: String,
    pub kind: String,
    pub bytes: u64,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Digest over kind and (path, size, content digest) of every file, sorted by path.
    pub fn compute_digest(kind: &str, files: &[FileEntry]) -> String {
        let mut h = blake3::Hasher::new_derive_key("msmae artifact v1");
        h.update(&(kind.len() as u64).to_le_bytes());
        h.update(kind.as_bytes());
        for f in files {
            h.update(&(f.path.len() as u64).to_le_bytes());
            h.update(f.path.as_bytes());
            h.update(&f.size.to_le_bytes());
            h.update(f.blake3.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

/// Where and how an artifact was produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// RFC 3339, UTC.
    pub started: String,
    pub seconds: f64,
    pub host: Host,
    /// Versions of the tools that produced it (msmae, burn, libtorch, ...).
    pub tools: std::collections::BTreeMap<String, String>,
    /// The CPU threads the backend's tensor operations used (CPU results depend on it);
    /// absent in records of an older msmae.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
}

/// The machine a stage ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub os: String,
    pub arch: String,
    pub cpus: usize,
    pub hostname: String,
    /// The CPU's model name (its instruction set changes CPU results); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu_model: String,
}

impl Host {
    pub fn current() -> Self {
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Host {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            hostname,
            cpu_model: cpu_model(),
        }
    }
}

/// The CPU's model name as `/proc/cpuinfo` gives it (empty elsewhere).
fn cpu_model() -> String {
    static MODEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default()
        })
        .clone()
}

/// Cache index entry: key → artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub key: String,
    pub artifact: String,
    pub kind: String,
    pub bytes: u64,
    pub files: u64,
    /// Name of the stage that produced it (informational).
    pub stage: String,
    pub parts: KeyParts,
    pub run: RunInfo,
}

/// A stage's output directory while it runs. Dropping it without committing removes it.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    /// Bytes written into it so far.
    pub fn bytes(&self) -> u64 {
        tree_bytes(&self.root)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_tree(&self.root);
        }
    }
}

/// Held while a key is computed; released on drop (and by the OS if the process dies).
/// Holds no file for a shared lock on a read-only store that has no lock file yet (no
/// process can write to that store, so there is nothing to exclude).
#[derive(Debug)]
pub struct KeyLock {
    _file: Option<fs::File>,
}

static NONCE: AtomicU64 = AtomicU64::new(0);

/// The marker file that makes a directory an msmae store.
pub const MARKER: &str = "MSMAE_STORE";
/// The store layout version the marker records.
pub const STORE_FORMAT: u32 = 1;
/// What a store holds at its top level (anything else makes a directory "not a store").
const LAYOUT: &[&str] = &["objects", "index", "tmp", "locks", "roots", "resume", "slurm", "hashmemo.tsv", MARKER];

/// A lock file registered with a store: where it is, and the artifacts it referenced when it
/// was last registered (gc keeps those while the file is missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub lock_file: PathBuf,
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// The record's file under `roots/`.
    #[serde(skip)]
    pub record: PathBuf,
}

/// The artifact store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    memo: HashMemo,
}

impl Store {
    /// Open the store at `root`, creating it when `root` is missing or an empty directory.
    /// A directory that holds anything but a store is refused ([`Error::NotAStore`]).
    pub fn open(root: &Path) -> Result<Self> {
        identify(root)?;
        // A folder of a read-only store is opened as it is (readers only).
        let ensure_dir = |p: &Path| match fs::create_dir_all(p) {
            Err(e) if !(is_read_only(&e) && p.is_dir()) => Err(Error::store("create", p, e)),
            _ => Ok(()),
        };
        // The marker first: another process opening the same new store (the ranks of an
        // MPI job) then sees a store, never a directory with msmae's folders but no marker.
        let marker = root.join(MARKER);
        if !marker.is_file() {
            ensure_dir(root)?;
            if let Err(e) = write_atomic(&marker, format!("msmae store format {STORE_FORMAT}\n").as_bytes()) {
                // An older store on a read-only mount: readable as it is.
                if !matches!(&e, Error::Store { source, .. } if is_read_only(source)) {
                    return Err(e);
                }
            }
        }
        for sub in ["objects", "index", "tmp", "locks", "roots"] {
            ensure_dir(&root.join(sub))?;
        }
        let root = root.canonicalize().map_err(|e| Error::store("open", root, e))?;
        let memo = HashMemo::load(&root.join("hashmemo.tsv"));
        Ok(Self { root, memo })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn memo(&self) -> &HashMemo {
        &self.memo
    }

    /// Whether the object is there and matches its manifest in files and sizes: what a
    /// cache hit checks before serving it (a full re-hash is `msmae verify`).
    pub fn object_intact(&self, digest: &str) -> std::result::Result<(), String> {
        let m = self.manifest(digest).map_err(|e| msmae_core::error::chain(&e))?;
        if m.digest != digest {
            return Err(format!("its manifest names digest {}", m.digest));
        }
        let data = self.object_dir(digest);
        for f in &m.files {
            match fs::metadata(data.join(&f.path)) {
                Ok(md) if md.len() == f.size => {}
                Ok(md) => return Err(format!("`{}` has {} bytes, the manifest records {}", f.path, md.len(), f.size)),
                Err(e) => return Err(format!("`{}`: {e}", f.path)),
            }
        }
        Ok(())
    }

    fn object_root(&self, digest: &str) -> PathBuf {
        self.root.join("objects").join(&digest[..2.min(digest.len())]).join(digest)
    }

    /// Directory holding an artifact's files.
    pub fn object_dir(&self, digest: &str) -> PathBuf {
        self.object_root(digest).join("data")
    }

    fn index_path(&self, key: &str) -> PathBuf {
        self.root.join("index").join(format!("{key}.json"))
    }

    /// The artifact's manifest.
    pub fn manifest(&self, digest: &str) -> Result<Manifest> {
        let p = self.object_root(digest).join("manifest.json");
        let text = fs::read_to_string(&p).map_err(|e| Error::store("read", &p, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Corrupt { path: p, message: e.to_string() })
    }

    /// Whether a complete object with this digest exists.
    pub fn has_object(&self, digest: &str) -> bool {
        self.object_root(digest).join("manifest.json").is_file()
    }

    /// The cached result for `key`, if its index entry and object are both present.
    pub fn lookup(&self, key: &str) -> Result<Option<IndexEntry>> {
        let Some(entry) = self.index_entry(key)? else { return Ok(None) };
        if !self.has_object(&entry.artifact) {
            return Ok(None);
        }
        // A damaged object is never fed downstream: it is reported and recomputed (the
        // recomputed artifact replaces it at commit).
        if let Err(why) = self.object_intact(&entry.artifact) {
            tracing::warn!("artifact {} of stage `{}` is damaged ({why}); recomputing it", entry.artifact, entry.stage);
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// The index entry of `key` as recorded (its object not checked); `None` when there is
    /// none or it is unreadable or names no digest.
    pub fn index_entry(&self, key: &str) -> Result<Option<IndexEntry>> {
        let p = self.index_path(key);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::store("read", &p, e)),
        };
        let entry: IndexEntry = match serde_json::from_str(&text) {
            Ok(e) => e,
            // A torn or foreign file: treat as a miss; the re-run overwrites it.
            Err(e) => {
                tracing::warn!("ignoring unreadable cache index entry {}: {e}", p.display());
                return Ok(None);
            }
        };
        if let Err(e) = check_digest(&entry.artifact) {
            tracing::warn!("ignoring cache index entry {}: {e}", p.display());
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// All index entries (for gc and inspection).
    pub fn index_entries(&self) -> Result<Vec<IndexEntry>> {
        let dir = self.root.join("index");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::store("list", &dir, e))? {
            let p = e.map_err(|e| Error::store("list", &dir, e))?.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Ok(entry) = fs::read_to_string(&p)
                    .map_err(|_| ())
                    .and_then(|t| serde_json::from_str::<IndexEntry>(&t).map_err(|_| ()))
                && check_digest(&entry.artifact).is_ok()
            {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Lock `key` for computing it. If another process holds it: with `wait`, log who and
    /// block until it is released; without, return [`Error::Busy`].
    pub fn lock_key(&self, key: &str, holder: &str, wait: bool) -> Result<KeyLock> {
        self.acquire(
            &self.key_lock_path(key),
            true,
            wait,
            holder,
            Blocker::Recorded { otherwise: "another msmae process" },
        )
    }

    /// Held by every runner for its whole run, shared; `gc` takes it exclusively, so gc and
    /// running pipelines exclude each other (a runner never sees its inputs collected, gc
    /// never sees a half-written run). `wait: false` fails at once with who holds it.
    pub fn run_lock(&self, exclusive: bool, wait: bool, holder: &str) -> Result<KeyLock> {
        // Shared holders do not record themselves (there may be many): an exclusive waiter
        // is told it waits for running pipelines.
        let blocker =
            if exclusive { Blocker::Named("a running pipeline") } else { Blocker::Recorded { otherwise: "msmae gc" } };
        self.acquire(&self.key_lock_path("store-gc"), exclusive, wait, holder, blocker)
    }

    /// Whether another process holds `key`'s lock right now, as this host sees it (the
    /// Slurm driver's check that locks on a shared store reach across nodes).
    pub fn key_lock_held(&self, key: &str) -> Result<bool> {
        let p = self.key_lock_path(key);
        let f = open_lock(&p)?;
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                Ok(false)
            }
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(Error::store("lock", &p, e)),
        }
    }

    fn key_lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// Take the lock file `p`, exclusive or shared. If another process holds it: with
    /// `wait`, log who (`blocker`) and block; without, [`Error::Busy`] naming them. An
    /// exclusive holder records itself for the next waiter's message.
    fn acquire(&self, p: &Path, exclusive: bool, wait: bool, holder: &str, blocker: Blocker) -> Result<KeyLock> {
        let mut f = match open_lock(p) {
            Ok(f) => f,
            // A read-only store (a mount shared read-only, an archived run): readers (a
            // fully cached run, status, why, verify) take the shared lock through a read-only
            // handle, or none where the file was never made.
            Err(Error::Store { source, .. }) if !exclusive && is_read_only(&source) => match fs::File::open(p) {
                Ok(f) => f,
                Err(_) => return Ok(KeyLock { _file: None }),
            },
            Err(Error::Store { source, .. }) if is_read_only(&source) => {
                return Err(Error::ReadOnly {
                    path: self.root.clone(),
                    what: format!("{holder} needs to write to it"),
                });
            }
            Err(e) => return Err(e),
        };
        match if exclusive { f.try_lock() } else { f.try_lock_shared() } {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let who = match blocker {
                    Blocker::Named(n) => n.to_string(),
                    Blocker::Recorded { otherwise } => {
                        let mut who = String::new();
                        let _ = f.read_to_string(&mut who);
                        if who.trim().is_empty() { otherwise.to_string() } else { who.trim().to_string() }
                    }
                };
                if !wait {
                    return Err(Error::Busy { path: p.to_path_buf(), holder: who });
                }
                tracing::info!("waiting for {who} (lock {})", p.display());
                if exclusive { f.lock() } else { f.lock_shared() }.map_err(|e| Error::store("lock", p, e))?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::store("lock", p, e)),
        }
        if exclusive {
            let _ = f.set_len(0);
            let _ = write!(
                f,
                "pid {} on {} ({holder}, since {})",
                std::process::id(),
                Host::current().hostname,
                now_rfc3339()
            );
            let _ = f.flush();
        }
        Ok(KeyLock { _file: Some(f) })
    }

    /// A fresh staging directory for `key`.
    pub fn begin(&self, key: &str) -> Result<Staging> {
        let n = NONCE.fetch_add(1, Ordering::Relaxed);
        // Key first (what cleaning reads), then host and pid: on a store shared by the nodes
        // of a cluster, pids repeat across hosts.
        let host: String = Host::current()
            .hostname
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .collect();
        let root = self.root.join("tmp").join(format!("{key}.{host}.{}.{n}", std::process::id()));
        let _ = remove_tree(&root);
        let data = root.join("data");
        fs::create_dir_all(&data).map_err(|e| Error::store("create", &data, e))?;
        Ok(Staging { root, committed: false })
    }

    /// Check a finished stage's output against its declaration and commit it; returns the
    /// manifest of the stored artifact. The caller then records the key with [`Self::record`].
    pub fn commit(&self, mut staging: Staging, stage: &str, decl: &OutputDecl) -> Result<Manifest> {
        let data = staging.data_dir();
        let files = hashing::list_files(&data)?;
        let undeclared: Vec<&str> = files.iter().map(|(r, _)| r.as_str()).filter(|r| !decl.declares(r)).collect();
        if !undeclared.is_empty() {
            return Err(Error::Output {
                stage: stage.into(),
                message: format!("wrote undeclared files {undeclared:?} (declared: {:?})", decl.files),
            });
        }
        let missing: Vec<&str> = decl.required().filter(|r| !files.iter().any(|(f, _)| f == r)).collect();
        if !missing.is_empty() {
            return Err(Error::Output {
                stage: stage.into(),
                message: format!("did not write required files {missing:?}"),
            });
        }
        check_no_symlinks(&data, stage)?;
        let entries: Vec<FileEntry> = files
            .par_iter()
            .map(|(rel, p)| {
                let f = fs::File::open(p).map_err(|e| Error::store("open", p, e))?;
                f.sync_all().map_err(|e| Error::store("fsync", p, e))?;
                let size = f.metadata().map_err(|e| Error::store("stat", p, e))?.len();
                let h = hashing::hash_file(p, size)?;
                fs::set_permissions(p, fs::Permissions::from_mode(0o444)).map_err(|e| Error::store("chmod", p, e))?;
                Ok(FileEntry { path: rel.clone(), size, blake3: blake3::Hash::from(h).to_hex().to_string() })
            })
            .collect::<Result<_>>()?;
        sync_dirs(&data)?;
        // The artifact's directories become read-only like its files: nothing is added to
        // or removed from a stored artifact (remove_tree lifts this for gc).
        seal_dirs(&data)?;
        let digest = Manifest::compute_digest(&decl.kind.0, &entries);
        let manifest = Manifest {
            digest: digest.clone(),
            kind: decl.kind.0.clone(),
            bytes: entries.iter().map(|f| f.size).sum(),
            files: entries,
        };
        if self.has_object(&digest) && self.object_intact(&digest).is_ok() {
            return Ok(manifest); // identical artifact already stored; staging is dropped
        }
        write_atomic(
            &staging.root.join("manifest.json"),
            &serde_json::to_vec_pretty(&manifest)
                .map_err(|e| Error::Corrupt { path: staging.root.clone(), message: e.to_string() })?,
        )?;
        let target = self.object_root(&digest);
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| Error::store("create", &parent, e))?;
        if target.exists() {
            // A leftover without manifest (a manual copy could leave one) or a damaged
            // object being recomputed: replace it.
            remove_tree(&target).map_err(|e| Error::store("remove", &target, e))?;
        }
        match fs::rename(&staging.root, &target) {
            Ok(()) => staging.committed = true,
            Err(_) if self.has_object(&digest) => return Ok(manifest), // a concurrent writer won
            Err(e) => return Err(Error::store("commit", &target, e)),
        }
        sync_dir(&parent)?;
        Ok(manifest)
    }

    /// Record `key → artifact` (after [`Self::commit`]).
    pub fn record(&self, entry: &IndexEntry) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(entry)
            .map_err(|e| Error::Corrupt { path: self.index_path(&entry.key), message: e.to_string() })?;
        write_atomic(&self.index_path(&entry.key), &bytes)
    }

    /// The checkpoint directory of `key` (`resume/<key>/`), created if missing; emptied
    /// first when the stage is forced (a forced run starts from scratch). It lives outside
    /// `tmp/` so that cleaning a killed run's staging keeps the checkpoints to resume from.
    pub fn resume_dir(&self, key: &str, fresh: bool) -> Result<PathBuf> {
        let dir = self.root.join("resume").join(key);
        if fresh && dir.exists() {
            remove_tree(&dir).map_err(|e| Error::store("remove", &dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| Error::store("create", &dir, e))?;
        Ok(dir)
    }

    /// Remove `key`'s checkpoints once its artifact is committed (best effort: a leftover
    /// only costs disk, and `gc` removes it).
    pub fn drop_resume_dir(&self, key: &str) {
        let dir = self.root.join("resume").join(key);
        if let Err(e) = remove_tree(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove checkpoints {}: {e}", dir.display());
        }
    }

    /// Checkpoint directories (`resume/<key>/`) that no runner is using: those of keys that
    /// are already committed (left behind when removal failed), and with `all`, also those
    /// of interrupted runs (which a re-run would resume from). Removed unless `dry_run`.
    pub fn clean_resume(&self, all: bool, dry_run: bool) -> Result<Vec<PathBuf>> {
        let dir = self.root.join("resume");
        let mut removed = Vec::new();
        let Ok(rd) = fs::read_dir(&dir) else { return Ok(removed) };
        for e in rd {
            let p = e.map_err(|e| Error::store("list", &dir, e))?.path();
            let key = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !is_key(&key) || p.is_symlink() || !p.is_dir() {
                tracing::warn!(
                    "left alone in the store's resume/: {} (not a checkpoint directory msmae made)",
                    p.display()
                );
                continue;
            }
            // A lock that cannot even be checked counts as held: nothing is removed.
            let free = !self.key_lock_held(&key).unwrap_or(true);
            let committed = matches!(self.lookup(&key), Ok(Some(_)));
            if free && (all || committed) {
                if !dry_run {
                    remove_tree(&p).map_err(|e| Error::store("remove", &p, e))?;
                }
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// Remove staging directories left by killed runs (those whose key lock is free). Only
    /// directories named as msmae names its staging (`<key>.…`) are touched; anything else
    /// in `tmp/` is reported and left alone.
    pub fn clean_stale_tmp(&self) -> Result<Vec<PathBuf>> {
        let dir = self.root.join("tmp");
        let mut removed = Vec::new();
        let Ok(rd) = fs::read_dir(&dir) else { return Ok(removed) };
        for e in rd {
            let p = e.map_err(|e| Error::store("list", &dir, e))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let key = name.split('.').next().unwrap_or("");
            let ours = is_key(key) && name.len() > key.len() && !p.is_symlink() && p.is_dir();
            if !ours {
                tracing::warn!("left alone in the store's tmp/: {} (not a staging directory msmae made)", p.display());
                continue;
            }
            // A lock that cannot even be checked counts as held: nothing is removed.
            let free = !self.key_lock_held(key).unwrap_or(true);
            if free {
                remove_tree(&p).map_err(|e| Error::store("remove", &p, e))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// Register a lock file as a gc root, remembering the artifacts it references (gc keeps
    /// them even while the file is missing). Written only when something changed.
    pub fn add_root(&self, lock_file: &Path, artifacts: &[String]) -> Result<()> {
        let abs = resolved_path(lock_file);
        let p = self.root.join("roots").join(root_id(&abs));
        let mut artifacts = artifacts.to_vec();
        artifacts.sort();
        artifacts.dedup();
        let root = Root { lock_file: abs, artifacts, record: p.clone() };
        if read_root(&p).is_some_and(|r| r == root) {
            return Ok(());
        }
        let bytes =
            serde_json::to_vec_pretty(&root).map_err(|e| Error::Corrupt { path: p.clone(), message: e.to_string() })?;
        write_atomic(&p, &bytes)
    }

    /// Every registered root, whether its lock file exists or not. Nothing is removed here:
    /// a root is forgotten only by [`Self::forget_root`].
    pub fn roots(&self) -> Result<Vec<Root>> {
        let dir = self.root.join("roots");
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&dir) else { return Ok(out) };
        for e in rd {
            let p = e.map_err(|e| Error::store("list", &dir, e))?.path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue; // a write in progress
            }
            if let Some(r) = read_root(&p) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.lock_file.cmp(&b.lock_file));
        Ok(out)
    }

    /// Forget the root of `lock_file` (`msmae gc --forget`); whether there was one.
    pub fn forget_root(&self, lock_file: &Path) -> Result<bool> {
        let abs = resolved_path(lock_file);
        let mut found = false;
        for r in self.roots()? {
            if r.lock_file == abs || r.lock_file == lock_file {
                fs::remove_file(&r.record).map_err(|e| Error::store("remove", &r.record, e))?;
                found = true;
            }
        }
        Ok(found)
    }

    /// Every object digest present.
    pub fn objects(&self) -> Result<Vec<String>> {
        let dir = self.root.join("objects");
        let mut out = Vec::new();
        for shard in fs::read_dir(&dir).map_err(|e| Error::store("list", &dir, e))? {
            let shard = shard.map_err(|e| Error::store("list", &dir, e))?.path();
            if !shard.is_dir() {
                continue;
            }
            for o in fs::read_dir(&shard).map_err(|e| Error::store("list", &shard, e))? {
                let o = o.map_err(|e| Error::store("list", &shard, e))?;
                out.push(o.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete an object (gc).
    pub fn remove_object(&self, digest: &str) -> Result<u64> {
        let p = self.object_root(digest);
        let bytes = self.manifest(digest).map(|m| m.bytes).unwrap_or(0);
        remove_tree(&p).map_err(|e| Error::store("remove", &p, e))?;
        Ok(bytes)
    }

    /// Delete an index entry (gc).
    pub fn remove_index(&self, key: &str) -> Result<()> {
        let p = self.index_path(key);
        fs::remove_file(&p).map_err(|e| Error::store("remove", &p, e))
    }

    /// Re-hash an artifact's files against its manifest; returns the problems found.
    pub fn verify_object(&self, digest: &str) -> Result<Vec<String>> {
        let m = self.manifest(digest)?;
        let dir = self.object_dir(digest);
        let mut problems: Vec<String> = m
            .files
            .par_iter()
            .filter_map(|f| {
                let p = dir.join(&f.path);
                match fs::metadata(&p) {
                    Err(e) => Some(format!("{}: {e}", f.path)),
                    Ok(md) if md.len() != f.size => {
                        Some(format!("{}: size {} ≠ recorded {}", f.path, md.len(), f.size))
                    }
                    Ok(md) => match hashing::hash_file(&p, md.len()) {
                        Err(e) => Some(msmae_core::error::chain(&e)),
                        Ok(h) if blake3::Hash::from(h).to_hex().as_str() != f.blake3 => {
                            Some(format!("{}: content differs from manifest", f.path))
                        }
                        Ok(_) => None,
                    },
                }
            })
            .collect();
        let present = hashing::list_files(&dir)?;
        for (rel, _) in present {
            if !m.files.iter().any(|f| f.path == rel) {
                problems.push(format!("{rel}: not in manifest"));
            }
        }
        if Manifest::compute_digest(&m.kind, &m.files) != m.digest || m.digest != digest {
            problems.push("manifest digest does not match its content".into());
        }
        problems.sort();
        Ok(problems)
    }
}

/// Whether `root` may be used as a store: missing, empty, marked, or an older msmae store
/// (only its own layout, with `objects/` and `index/`).
fn identify(root: &Path) -> Result<()> {
    let md = match fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::store("open", root, e)),
        Ok(m) => m,
    };
    let dir_md =
        if md.file_type().is_symlink() { fs::metadata(root).map_err(|e| Error::store("open", root, e))? } else { md };
    if !dir_md.is_dir() {
        return Err(Error::NotAStore { path: root.to_path_buf(), found: "it is not a directory".into() });
    }
    if root.join(MARKER).is_file() {
        let text = fs::read_to_string(root.join(MARKER)).unwrap_or_default();
        let version = text.trim().rsplit(' ').next().and_then(|v| v.parse::<u32>().ok());
        return match version {
            Some(v) if v <= STORE_FORMAT => Ok(()),
            Some(v) => Err(Error::NotAStore {
                path: root.to_path_buf(),
                found: format!("it is a store of format {v}, newer than this msmae's {STORE_FORMAT}"),
            }),
            None => {
                Err(Error::NotAStore { path: root.to_path_buf(), found: format!("its {MARKER} file is unreadable") })
            }
        };
    }
    let names: Vec<String> = fs::read_dir(root)
        .map_err(|e| Error::store("list", root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Another process writing the marker of this new store right now.
    let marker_in_progress = |n: &str| n.starts_with(&format!(".{MARKER}.tmp."));
    if names.iter().all(|n| marker_in_progress(n)) {
        return Ok(());
    }
    let older_store = names.iter().all(|n| LAYOUT.contains(&n.as_str()))
        && root.join("objects").is_dir()
        && root.join("index").is_dir();
    if older_store {
        return Ok(());
    }
    let foreign: Vec<&String> = names.iter().filter(|n| !LAYOUT.contains(&n.as_str())).collect();
    // Folders named like a store's (`tmp/`, `resume/`) without a store's `objects/` and
    // `index/` are someone else's too: name them.
    let mut shown: Vec<&String> = if foreign.is_empty() { names.iter().collect() } else { foreign };
    shown.sort();
    let more = if shown.len() > 3 { format!(" and {} more", shown.len() - 3) } else { String::new() };
    let list = shown.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    Err(Error::NotAStore { path: root.to_path_buf(), found: format!("it holds other files ({list}{more})") })
}

/// Whether `s` is a cache key (64 lowercase hex digits): what msmae names its entries by.
pub fn is_key(s: &str) -> bool {
    check_digest(s).is_ok()
}

/// `p` as one absolute path however it is spelled (`./x`, `../d/x`, a symlinked folder),
/// also when the file itself does not exist yet: the canonical path, else the canonical
/// folder joined with the file name, else the absolute path.
pub fn resolved_path(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent().and_then(|d| d.canonicalize().ok()), abs.file_name()) {
        (Some(d), Some(f)) => d.join(f),
        _ => abs,
    }
}

fn root_id(abs: &Path) -> String {
    blake3::hash(abs.to_string_lossy().as_bytes()).to_hex()[..16].to_string()
}

/// A root record: JSON, or the bare path an older msmae wrote.
fn read_root(p: &Path) -> Option<Root> {
    let text = fs::read_to_string(p).ok()?;
    let mut r = match serde_json::from_str::<Root>(&text) {
        Ok(r) => r,
        Err(_) if !text.trim().is_empty() && !text.trim_start().starts_with('{') => {
            Root { lock_file: PathBuf::from(text.trim()), artifacts: Vec::new(), record: PathBuf::new() }
        }
        Err(_) => return None,
    };
    r.artifacts.retain(|d| check_digest(d).is_ok());
    r.record = p.to_path_buf();
    Some(r)
}

fn check_no_symlinks(dir: &Path, stage: &str) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::store("list", dir, e))? {
        let e = e.map_err(|e| Error::store("list", dir, e))?;
        let ft = e.file_type().map_err(|err| Error::store("stat", e.path(), err))?;
        if ft.is_symlink() {
            return Err(Error::Output {
                stage: stage.into(),
                message: format!("{} is a symbolic link; artifacts hold plain files", e.path().display()),
            });
        }
        if ft.is_dir() {
            check_no_symlinks(&e.path(), stage)?;
        }
    }
    Ok(())
}

/// Write a file atomically: temp sibling, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()));
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::store("write", path, e));
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    // `Path::parent` of a bare file name is the empty path: the current directory.
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::store("fsync", dir, e))
}

fn sync_dirs(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::store("list", dir, e))? {
        let p = e.map_err(|e| Error::store("list", dir, e))?.path();
        if p.is_dir() {
            sync_dirs(&p)?;
        }
    }
    sync_dir(dir)
}

/// Who a waiter for a lock is told it waits for.
#[derive(Clone, Copy)]
enum Blocker {
    /// The holder the lock file records (`otherwise` when it records none).
    Recorded { otherwise: &'static str },
    /// Always this (shared holders record nothing).
    Named(&'static str),
}

fn open_lock(p: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map_err(|e| Error::store("open lock", p, e))
}

/// Digests (of artifacts) are 64 lowercase hex characters; anything else read from a lock
/// or index file is refused before a path is built from it (`../..` would leave the store).
pub fn check_digest(d: &str) -> std::result::Result<(), String> {
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("`{d}` is not an artifact digest (64 hex characters)"))
    }
}

/// Make `dir` and every directory below it read-only (0555), deepest first.
fn seal_dirs(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::store("list", dir, e))? {
        let p = e.map_err(|e| Error::store("list", dir, e))?.path();
        if p.is_dir() && !p.is_symlink() {
            seal_dirs(&p)?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555)).map_err(|e| Error::store("chmod", dir, e))
}

/// Make `dir` and every directory below it writable again (0755), top first.
fn unseal_dirs(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                unseal_dirs(&p);
            }
        }
    }
}

/// Remove a directory tree, including a stored artifact's read-only directories.
pub fn remove_tree(p: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Entries of a read-only directory cannot be unlinked (by anyone but root):
            // make the directories writable and retry.
            unseal_dirs(p);
            fs::remove_dir_all(p)
        }
    }
}

/// Whether an I/O error says the store cannot be written (a read-only mount, or no write
/// permission on it).
pub fn is_read_only(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied)
}

/// Bytes available to this user on the filesystem holding `p`, if it can be asked.
pub fn free_bytes(p: &Path) -> Option<u64> {
    rustix::fs::statvfs(p).ok().map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Total size of the plain files under `p` (0 when it is gone).
pub fn tree_bytes(p: &Path) -> u64 {
    hashing::list_files(p).unwrap_or_default().iter().filter_map(|(_, f)| fs::metadata(f).ok()).map(|m| m.len()).sum()
}

/// Human-readable byte count (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
