//! Content hashing of files and directory trees, memoised by (path, size, mtime, inode) so
//! that a no-op re-run over a 100k-image dataset only stats files.
//!
//! A memo entry is trusted only if the file's size, modification time (ns) and inode are
//! unchanged. Entries whose mtime is within [`RACY_WINDOW`] of the moment they were hashed
//! are not memoised: a write in the same timestamp tick could otherwise go unnoticed (the
//! "racy clean" problem git solves the same way).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Files modified this recently before hashing are not memoised.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Files at least this large are hashed multi-threaded, a chunk of this size at a time.
const LARGE_FILE: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Self {
        Stamp {
            size: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            inode: md.ino(),
        }
    }
}

/// Memo of file digests, persisted as a small text file in the store. Files are keyed by
/// a 128-bit BLAKE3 hash of their path, so a memo of a million files stays under 100 MB.
#[derive(Debug, Default)]
pub struct HashMemo {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<PathKey, (Stamp, [u8; 32])>>,
    dirty: Mutex<bool>,
}

/// A memo key: the first 128 bits of the BLAKE3 hash of a path's bytes.
type PathKey = [u8; 16];

fn path_key(path: &Path) -> PathKey {
    let h = blake3::hash(path.as_os_str().as_encoded_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.as_bytes()[..16]);
    k
}

fn key_hex(k: &PathKey) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_key(field: &str) -> Option<PathKey> {
    // A key is 32 hex digits; anything else is a path (memos that named their files).
    if field.len() != 32 || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(path_key(Path::new(field)));
    }
    let mut k = [0u8; 16];
    for (i, byte) in k.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&field[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

/// The digest of one file or tree and how much was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub hex: String,
    pub files: u64,
    pub bytes: u64,
    /// Bytes actually read (not served from the memo).
    pub hashed_bytes: u64,
}

impl HashMemo {
    /// An in-memory memo (nothing persisted).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Load the memo at `path` (missing or unreadable: start empty; it is only a cache).
    pub fn load(path: &Path) -> Self {
        let mut entries = HashMap::new();
        if let Ok(text) = fs::read_to_string(path) {
            for line in text.lines() {
                let mut it = line.splitn(5, '\t');
                let parsed = (|| {
                    let hex = it.next()?;
                    let size = it.next()?.parse().ok()?;
                    let mtime_ns = it.next()?.parse().ok()?;
                    let inode = it.next()?.parse().ok()?;
                    let key = parse_key(it.next()?)?;
                    let h = blake3::Hash::from_hex(hex).ok()?;
                    Some((key, (Stamp { size, mtime_ns, inode }, *h.as_bytes())))
                })();
                if let Some((p, e)) = parsed {
                    entries.insert(p, e);
                }
            }
        }
        Self { path: Some(path.to_path_buf()), entries: Mutex::new(entries), dirty: Mutex::new(false) }
    }

    /// Persist if changed (atomically: temp file + rename). Failing to save only costs time
    /// on the next run, so the error is returned for logging, not treated as fatal.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if !*dirty {
            return Ok(());
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = entries.iter().collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        {
            let mut f = std::io::BufWriter::new(fs::File::create(&tmp)?);
            for (k, (s, h)) in rows {
                let (hash, key) = (blake3::Hash::from(*h).to_hex(), key_hex(k));
                writeln!(f, "{hash}\t{}\t{}\t{}\t{key}", s.size, s.mtime_ns, s.inode)?;
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        *dirty = false;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Digest of one file; `Ok((hash, bytes_read))`.
    pub fn file(&self, path: &Path) -> Result<([u8; 32], u64, u64)> {
        let md = fs::metadata(path).map_err(|source| Error::Hash { path: path.to_path_buf(), source })?;
        let stamp = Stamp::of(&md);
        let key = path_key(path);
        if let Some((s, h)) = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && *s == stamp
        {
            return Ok((*h, stamp.size, 0));
        }
        let h = hash_file(path, stamp.size)?;
        if !racy(md.modified().ok(), SystemTime::now()) {
            self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (stamp, h));
            *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
        Ok((h, stamp.size, stamp.size))
    }

    /// Digest of a file or a directory tree (relative paths, sizes and contents; symlinks
    /// followed; empty directories ignored).
    pub fn tree(&self, root: &Path) -> Result<Digest> {
        let md = fs::metadata(root).map_err(|source| Error::Hash { path: root.to_path_buf(), source })?;
        if md.is_file() {
            let (h, bytes, read) = self.file(root)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"file\0");
            hasher.update(&h);
            return Ok(Digest { hex: hasher.finalize().to_hex().to_string(), files: 1, bytes, hashed_bytes: read });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"tree\0");
        let (mut files, mut bytes, mut read) = (0, 0, 0);
        walk_files(root, WALK_BATCH, |batch| {
            let hashed: Vec<([u8; 32], u64, u64)> =
                batch.par_iter().map(|(_, p)| self.file(p)).collect::<Result<_>>()?;
            for ((rel, _), (h, size, r)) in batch.iter().zip(&hashed) {
                hasher.update(&(rel.len() as u64).to_le_bytes());
                hasher.update(rel.as_bytes());
                hasher.update(&size.to_le_bytes());
                hasher.update(h);
                files += 1;
                bytes += size;
                read += r;
            }
            Ok(())
        })?;
        Ok(Digest { hex: hasher.finalize().to_hex().to_string(), files, bytes, hashed_bytes: read })
    }

    /// Digest of a list of files named somewhere else (a manifest's images): sizes and
    /// contents in the listed order, each file once (first occurrence). Paths are not
    /// hashed, so moving a checkout keeps the digest; the list's own file is an external
    /// input of its own. A missing file is hashed as missing (the stage decides what that
    /// means), so it appearing later changes the digest.
    pub fn listed(&self, files: &[PathBuf]) -> Result<Digest> {
        let mut seen = std::collections::HashSet::new();
        let files: Vec<&PathBuf> = files.iter().filter(|p| seen.insert(p.as_path())).collect();
        let hashed: Vec<Option<([u8; 32], u64, u64)>> = files
            .par_iter()
            // Whatever `Path::is_file` says is not a file (absent, a folder, a path through
            // a file, unreadable) is hashed as missing: the stage sees the same and applies
            // its error policy to that row.
            .map(|p| if p.is_file() { self.file(p).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"listed\0");
        let (mut n, mut bytes, mut read) = (0, 0, 0);
        for h in &hashed {
            match h {
                Some((h, size, r)) => {
                    hasher.update(b"f");
                    hasher.update(&size.to_le_bytes());
                    hasher.update(h);
                    n += 1;
                    bytes += size;
                    read += r;
                }
                None => {
                    hasher.update(b"-");
                }
            }
        }
        Ok(Digest { hex: hasher.finalize().to_hex().to_string(), files: n, bytes, hashed_bytes: read })
    }
}

/// Whether a file modified at `mtime` is too fresh at `now` to memoise (unknown and future
/// times included).
fn racy(mtime: Option<SystemTime>, now: SystemTime) -> bool {
    mtime.and_then(|m| now.duration_since(m).ok()).is_none_or(|age| age < RACY_WINDOW)
}

/// Hash a file's content (multi-threaded for large files). Large files are read in chunks
/// of 16 MiB, not mapped: a mapped file's pages count in the process's
/// resident memory as they are read, so hashing a 2 GB image table would raise the peak RSS
/// of the stage that wrote it by 2 GB. (BLAKE3's digest does not depend on how the input
/// is split between updates.)
pub fn hash_file(path: &Path, size: u64) -> Result<[u8; 32]> {
    let err = |source| Error::Hash { path: path.to_path_buf(), source };
    let mut hasher = blake3::Hasher::new();
    let mut f = fs::File::open(path).map_err(err)?;
    if size >= LARGE_FILE {
        use std::io::Read;
        let mut buf = Vec::with_capacity(LARGE_FILE as usize);
        loop {
            buf.clear();
            let n = (&mut f).take(LARGE_FILE).read_to_end(&mut buf).map_err(err)?;
            hasher.update_rayon(&buf);
            if n < LARGE_FILE as usize {
                break;
            }
        }
    } else {
        hasher.update_reader(f).map_err(err)?;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Files hashed together when digesting a tree.
const WALK_BATCH: usize = 4096;

/// Every regular file under `root` as (`/`-separated relative path, full path), sorted.
pub fn list_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    walk_files(root, WALK_BATCH, |batch| {
        out.extend_from_slice(batch);
        Ok(())
    })?;
    Ok(out)
}

/// Every regular file under `root` (symlinks followed), in the order of their `/`-separated
/// relative paths, handed to `visit` in batches of up to `batch` as (relative path, full
/// path). Only the listing of the directories being walked and one batch are held, so a
/// tree of a million images costs little memory.
///
/// Each directory's entries are sorted by name, a folder's name with `/` appended: the
/// relative path of an entry starts with that key and no key is a prefix of another's
/// path, so this depth-first order is the sorted order of the relative paths.
pub fn walk_files(root: &Path, batch: usize, mut visit: impl FnMut(&[(String, PathBuf)]) -> Result<()>) -> Result<()> {
    let mut pending = Vec::with_capacity(batch.max(1));
    walk_dir(root, root, batch.max(1), &mut pending, &mut visit)?;
    if !pending.is_empty() {
        visit(&pending)?;
    }
    Ok(())
}

fn walk_dir(
    root: &Path,
    dir: &Path,
    batch: usize,
    pending: &mut Vec<(String, PathBuf)>,
    visit: &mut impl FnMut(&[(String, PathBuf)]) -> Result<()>,
) -> Result<()> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Hash { path, source }
    };
    let mut entries: Vec<(String, PathBuf, bool)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(err(dir))? {
        let entry = entry.map_err(err(dir))?;
        let p = entry.path();
        // The directory entry's type is free (no stat); only links need following.
        let ft = entry.file_type().map_err(err(&p))?;
        let ft = if ft.is_symlink() { fs::metadata(&p).map_err(err(&p))?.file_type() } else { ft };
        let name = entry.file_name().to_string_lossy().into_owned();
        if ft.is_dir() {
            entries.push((name + "/", p, true));
        } else if ft.is_file() {
            entries.push((name, p, false));
        }
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (_, p, is_dir) in entries {
        if is_dir {
            walk_dir(root, &p, batch, pending, visit)?;
            continue;
        }
        let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/");
        pending.push((rel, p));
        if pending.len() >= batch {
            visit(pending)?;
            pending.clear();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(p: &Path) {
        // Make the file look old enough to be memoised.
        let f = fs::File::options().write(true).open(p).expect("open");
        f.set_modified(SystemTime::now() - Duration::from_secs(60)).expect("set mtime");
    }

    /// The chunked path of large files gives BLAKE3 of the whole content, at and around the
    /// chunk boundaries (a file of exactly one or two chunks, one byte more).
    #[test]
    fn large_files_hash_in_chunks_to_the_digest_of_their_content() {
        let d = tempfile::tempdir().expect("tmp");
        let chunk = LARGE_FILE as usize;
        for len in [chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 7] {
            let bytes: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let p = d.path().join(format!("f{len}"));
            fs::write(&p, &bytes).expect("write");
            assert_eq!(hash_file(&p, len as u64).expect("hash"), *blake3::hash(&bytes).as_bytes(), "{len} bytes");
        }
    }

    #[test]
    fn tree_digest_depends_on_names_and_contents_and_uses_memo() {
        let d = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(d.path().join("a/b")).expect("mkdir");
        fs::write(d.path().join("a/b/x.png"), b"xx").expect("w");
        fs::write(d.path().join("a/y.csv"), b"yy").expect("w");
        age(&d.path().join("a/b/x.png"));
        age(&d.path().join("a/y.csv"));
        let memo = HashMemo::load(&d.path().join("memo.tsv"));
        let t1 = memo.tree(&d.path().join("a")).expect("hash");
        assert_eq!((t1.files, t1.bytes, t1.hashed_bytes), (2, 4, 4));
        let t2 = memo.tree(&d.path().join("a")).expect("hash");
        assert_eq!(t2.hex, t1.hex);
        assert_eq!(t2.hashed_bytes, 0, "second pass is served from the memo");
        memo.save().expect("save");
        let reloaded = HashMemo::load(&d.path().join("memo.tsv"));
        assert_eq!(reloaded.len(), 2);
        assert_eq!(reloaded.tree(&d.path().join("a")).expect("hash").hashed_bytes, 0);
        // Same size, new content: the mtime changes, so it is re-read.
        fs::write(d.path().join("a/y.csv"), b"zz").expect("w");
        let t3 = reloaded.tree(&d.path().join("a")).expect("hash");
        assert_ne!(t3.hex, t1.hex);
        assert_eq!(t3.hashed_bytes, 2);
        // A rename changes the digest even with identical bytes.
        fs::rename(d.path().join("a/y.csv"), d.path().join("a/w.csv")).expect("mv");
        assert_ne!(reloaded.tree(&d.path().join("a")).expect("hash").hex, t3.hex);
    }

    /// The walk's depth-first order is the sorted order of the relative paths (names that
    /// sort around `/`: `a.txt` < `a/…` < `a0`, `a-/…` < `a/…`), whatever the batch size, and
    /// the tree digest is the one over that sorted list.
    #[test]
    fn the_walk_visits_files_in_sorted_relative_path_order_in_batches() {
        let d = tempfile::tempdir().expect("tmp");
        let names = ["a.txt", "a/b", "a/b.c", "a/c/d", "a-/e", "a0", "a b", "ab/f", "z", "a/c.d"];
        for n in names {
            let p = d.path().join(n);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, n.as_bytes()).expect("w");
        }
        let mut sorted: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        sorted.sort();
        for batch in [1, 2, 3, 100] {
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            walk_files(d.path(), batch, |b| {
                sizes.push(b.len());
                seen.extend(b.iter().map(|(rel, full)| {
                    assert_eq!(full, &d.path().join(rel));
                    rel.clone()
                }));
                Ok(())
            })
            .expect("walk");
            assert_eq!(seen, sorted, "batch {batch}");
            assert!(sizes.iter().all(|n| *n <= batch && *n > 0), "{sizes:?}");
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"tree\0");
        for rel in &sorted {
            hasher.update(&(rel.len() as u64).to_le_bytes());
            hasher.update(rel.as_bytes());
            hasher.update(&(rel.len() as u64).to_le_bytes());
            hasher.update(blake3::hash(rel.as_bytes()).as_bytes());
        }
        assert_eq!(HashMemo::in_memory().tree(d.path()).expect("tree").hex, hasher.finalize().to_hex().to_string());
    }

    /// The memo keys files by a hash of their path; a memo that names its files by path
    /// still serves them.
    #[test]
    fn the_memo_is_keyed_by_path_hash_and_reads_path_keyed_lines() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("img.png");
        fs::write(&f, b"pixels").expect("w");
        age(&f);
        let memo_path = d.path().join("memo.tsv");
        let memo = HashMemo::load(&memo_path);
        let (h, _, read) = memo.file(&f).expect("hash");
        assert_eq!(read, 6);
        memo.save().expect("save");
        let text = fs::read_to_string(&memo_path).expect("memo");
        let key = text.trim_end().rsplit('\t').next().expect("key");
        assert_eq!(key, key_hex(&path_key(&f)));
        assert!(!text.contains("img.png"), "{text}");
        // The same line naming the file by its path.
        let named = text.replacen(key, &f.display().to_string(), 1);
        fs::write(&memo_path, named).expect("w");
        let (h2, _, read) = HashMemo::load(&memo_path).file(&f).expect("hash");
        assert_eq!((h2, read), (h, 0), "served from the path-keyed line");
    }

    #[test]
    fn freshly_written_files_are_not_memoised() {
        let now = SystemTime::now();
        let ago = |s: f64| Some(now - Duration::from_secs_f64(s));
        assert!(
            racy(ago(0.0), now)
                && racy(ago(1.9), now)
                && racy(None, now)
                && racy(Some(now + Duration::from_secs(5)), now)
        );
        assert!(!racy(ago(2.0), now) && !racy(ago(3600.0), now));
        // Through the memo, without depending on how long hashing takes: a file dated in
        // the future is never old enough.
        let d = tempfile::tempdir().expect("tmp");
        fs::write(d.path().join("f"), b"new").expect("w");
        fs::File::options()
            .write(true)
            .open(d.path().join("f"))
            .expect("open")
            .set_modified(now + Duration::from_secs(3600))
            .expect("touch");
        let memo = HashMemo::in_memory();
        memo.file(&d.path().join("f")).expect("hash");
        assert!(memo.is_empty());
    }

    #[test]
    fn listed_paths_that_are_not_files_hash_as_missing() {
        let d = tempfile::tempdir().expect("tmp");
        fs::write(d.path().join("f"), b"x").expect("w");
        let memo = HashMemo::in_memory();
        // through a file, a folder, absent: no error, each counted as missing
        let odd = [d.path().join("f/x.png"), d.path().to_path_buf(), d.path().join("absent.png")];
        let g = memo.listed(&odd).expect("no error");
        assert_eq!((g.files, g.bytes), (0, 0));
        let with_file = memo.listed(&[odd[0].clone(), d.path().join("f")]).expect("hash");
        assert_eq!(with_file.files, 1);
        assert_ne!(
            memo.listed(&odd[..1]).expect("hash").hex,
            memo.listed(&odd[..2]).expect("hash").hex,
            "each missing entry counts"
        );
    }

    #[test]
    fn missing_path_names_it() {
        let memo = HashMemo::in_memory();
        let e = memo.tree(Path::new("/nonexistent/dataset")).expect_err("fails");
        assert!(e.to_string().contains("/nonexistent/dataset"), "{e}");
    }
}
