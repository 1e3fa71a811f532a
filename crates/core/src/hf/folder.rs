//! Files and folders written so that a crash or power loss never leaves half of one in place:
//! every file and folder is fsync'd before it is renamed into place and its parent after; the
//! manifest (sizes and SHA-256 of every file) that proves a folder complete; and the rule of
//! which existing folders a command may replace (never one holding what we did not write, never
//! an input).
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The 1-based line of the first byte of `bytes` that is not UTF-8, and the message for it.
pub fn utf8_problem(bytes: &[u8], e: &std::str::Utf8Error) -> (usize, String) {
    let at = e.valid_up_to();
    let line_start = bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    let byte = bytes.get(at).copied().unwrap_or(0);
    (line, format!("invalid UTF-8: byte 0x{byte:02x} at column {} (expected UTF-8 text)", at - line_start + 1))
}

/// A whole text file; one that is not UTF-8 is an error naming the file, line and column.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let (line, message) = utf8_problem(e.as_bytes(), &e.utf8_error());
        anyhow!("{}:{line}: {message}", path.display())
    })
}

/// Flushes a file's data (or a folder's entries) to the disk.
pub fn sync_path(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("{}: cannot open to sync", path.display()))?;
    f.sync_all().with_context(|| format!("{}: fsync failed", path.display()))
}

/// Flushes every file under `dir`, then every folder bottom-up, then `dir` itself.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_path(&path)?;
        }
    }
    sync_path(dir)
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` through a temporary sibling: written, fsync'd, renamed into place,
/// the folder fsync'd. A crash leaves the old content or the new one, never a mix.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_streamed(path, |f| {
        std::io::Write::write_all(f, bytes).with_context(|| format!("{}: cannot write", path.display()))
    })
}

/// `write_file_atomic` for content too large to hold in memory: `fill` writes it into the
/// temporary sibling (created with the parent folders), which is then fsync'd and renamed into
/// place. On error the temporary file is removed and `path` is left as it was.
pub fn write_file_streamed(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let parent = parent_of(path);
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = path.file_name().ok_or_else(|| anyhow!("{}: not a file path", path.display()))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        fill(&mut f)?;
        f.sync_all().with_context(|| format!("{}: fsync failed", tmp.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    sync_path(parent)
}

/// Runs `fill` on a fresh temporary folder next to `out`, fsyncs everything in it, renames it to
/// `out` (replacing an existing folder) and fsyncs the parent. A crash leaves `out` either absent,
/// old, or complete — and complete on disk, not only in the page cache.
pub fn write_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(out);
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let name = out.file_name().ok_or_else(|| anyhow!("{}: not a folder path", out.display()))?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|_| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old).with_context(|| format!("{}: cannot move aside", out.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
        sync_path(parent)?;
        std::fs::remove_dir_all(&old).with_context(|| format!("{}: cannot remove", old.display()))?;
    } else {
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
    }
    sync_path(parent)
}

/// An advisory lock (flock) on a folder that one process writes (a training output folder, a
/// pipeline run folder), held until dropped. The lock file holds the holder's PID; the kernel
/// releases the lock when its process dies, so a stale lock file is simply taken over.
pub struct FolderLock {
    _file: File,
    pub path: PathBuf,
}

impl FolderLock {
    /// Takes `dir/NAME`'s lock, creating `dir`; fails at once, naming the holder's PID, when
    /// another process holds it.
    pub fn acquire(dir: &Path, name: &str) -> Result<FolderLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = Some(holder.trim()).filter(|h| !h.is_empty()).unwrap_or("unknown");
                bail!(
                    "{}: in use by another align process (PID {holder}; lock {}): one align process writes a folder at a time — wait for it, or stop it",
                    dir.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(anyhow!("{}: cannot lock: {e}", path.display()));
            }
        }
        file.set_len(0).with_context(|| format!("{}: cannot write", path.display()))?;
        std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(FolderLock { _file: file, path })
    }
}

/// Size and SHA-256 of one file of a folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// Every file of a folder (relative paths, `/`-separated) with its size and hash.
pub type Manifest = BTreeMap<String, FileDigest>;

/// SHA-256 hex digest of a file's bytes, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The manifest of every file under `dir` except `leave_out` (a name at the top level).
pub fn folder_manifest(dir: &Path, leave_out: Option<&str>) -> Result<Manifest> {
    fn walk(root: &Path, dir: &Path, leave_out: Option<&str>, out: &mut Manifest) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let key = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            if leave_out == Some(key.as_str()) {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, leave_out, out)?;
            } else {
                let bytes = path.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
                out.insert(key, FileDigest { bytes, sha256: sha256_file(&path)? });
            }
        }
        Ok(())
    }
    let mut m = Manifest::new();
    walk(dir, dir, leave_out, &mut m)?;
    Ok(m)
}

/// Checks the files of `dir` against `manifest`: each present with its recorded size and hash.
/// The error names the first file that differs.
pub fn verify_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    for (rel, want) in manifest {
        let path = dir.join(rel);
        let meta = path.metadata().map_err(|_| anyhow!("{}: missing (the checkpoint recorded it)", path.display()))?;
        if meta.len() != want.bytes {
            bail!("{}: {} bytes, but {} were written (truncated or changed)", path.display(), meta.len(), want.bytes);
        }
        if sha256_file(&path)? != want.sha256 {
            bail!(
                "{}: its SHA-256 differs from the one recorded when it was written (corrupt or changed)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Names a model, adapter or tokenizer folder written by this project may hold: such a folder
/// may be replaced by a new one of the same kind.
fn is_model_folder_file(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
    ];
    NAMES.contains(&name)
        || crate::hf::checkpoint::COMPANION_FILES.contains(&name)
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}

/// `path` made absolute with `.`/`..` resolved and symlinks followed as far as it exists.
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        match Path::new(&name).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) | None => {}
            _ => out.push(name),
        }
    }
    Ok(out)
}

/// Refuses an output folder a command would replace unless that is safe: `out` must not be, hold
/// or lie inside any of `inputs`; if it exists it must be a folder that is empty or holds only the
/// files of a model/adapter/tokenizer folder (what this project writes) — any other content needs
/// `force`. `flag` names the option in the message (`--out`).
pub fn check_replaceable(out: &Path, inputs: &[&Path], force: bool, flag: &str) -> Result<()> {
    let out_abs = absolute(out)?;
    for input in inputs {
        let input_abs = absolute(input)?;
        if out_abs == input_abs {
            bail!("{flag} {}: is an input ({}); choose a new folder", out.display(), input.display());
        }
        if input_abs.starts_with(&out_abs) {
            bail!("{flag} {}: holds the input {}; choose a folder outside it", out.display(), input.display());
        }
        if out_abs.starts_with(&input_abs) {
            bail!("{flag} {}: lies inside the input {}; choose a folder outside it", out.display(), input.display());
        }
    }
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{flag} {}: exists and is not a folder; choose a new folder", out.display());
    }
    if force {
        return Ok(());
    }
    let mut foreign: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("{}: cannot list", out.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| !(e.path().is_file() && is_model_folder_file(&e.file_name().to_string_lossy())))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    // name what a user would recognise first (hidden files last)
    foreign.sort_by_key(|n| (n.starts_with('.'), n.clone()));
    if let Some(first) = foreign.first() {
        let more = if foreign.len() > 1 { format!(" and {} more", foreign.len() - 1) } else { String::new() };
        bail!(
            "{flag} {}: not empty and not a model folder (it holds '{first}'{more}); it would be replaced — choose a new folder, or pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("align-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaceable_only_when_ours_and_not_an_input() {
        let d = tmp("replace");
        let model = d.join("models/base");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        // the parent of an input
        let e = check_replaceable(&d.join("models"), &[&model], false, "--out").unwrap_err().to_string();
        assert!(e.contains("holds the input"), "{e}");
        // the input itself, spelled differently
        let e = check_replaceable(&d.join("models/./base"), &[&model], true, "--out").unwrap_err().to_string();
        assert!(e.contains("is an input"), "{e}");
        // inside an input, not yet existing
        let e = check_replaceable(&model.join("merged/x"), &[&model], true, "--out").unwrap_err().to_string();
        assert!(e.contains("inside the input"), "{e}");
        // a folder holding a user's file
        let user = d.join("mine");
        std::fs::create_dir_all(&user).unwrap();
        std::fs::write(user.join("notes.txt"), "keep me").unwrap();
        std::fs::write(user.join("config.json"), "{}").unwrap();
        let e = check_replaceable(&user, &[&model], false, "--out").unwrap_err().to_string();
        assert!(e.contains("'notes.txt'") && e.contains("--force"), "{e}");
        assert!(check_replaceable(&user, &[&model], true, "--out").is_ok());
        // a model folder, an empty one, a new one
        let ours = d.join("ours");
        std::fs::create_dir_all(&ours).unwrap();
        assert!(check_replaceable(&ours, &[&model], false, "--out").is_ok());
        for f in ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json"] {
            std::fs::write(ours.join(f), "x").unwrap();
        }
        assert!(check_replaceable(&ours, &[&model], false, "--out").is_ok());
        assert!(check_replaceable(&d.join("new"), &[&model], false, "--out").is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn manifest_sees_truncation_and_changes() {
        let d = tmp("manifest");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a.bin"), vec![7u8; 1000]).unwrap();
        std::fs::write(d.join("sub/b.json"), "{\"x\": 1}").unwrap();
        std::fs::write(d.join("COMPLETE"), "x").unwrap();
        let m = folder_manifest(&d, Some("COMPLETE")).unwrap();
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec!["a.bin".to_string(), "sub/b.json".to_string()]);
        verify_manifest(&d, &m).unwrap();
        std::fs::write(d.join("sub/b.json"), "{\"x\": 2}").unwrap();
        let e = verify_manifest(&d, &m).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("SHA-256"), "{e}");
        std::fs::write(d.join("sub/b.json"), "{\"x\": 1}").unwrap();
        std::fs::write(d.join("a.bin"), vec![7u8; 10]).unwrap();
        let e = verify_manifest(&d, &m).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_held_lock_names_its_holder_and_a_released_one_is_taken_over() {
        let d = tmp("lock");
        let held = FolderLock::acquire(&d, ".lock").unwrap();
        // a second open file description conflicts with flock even within one process
        let e = FolderLock::acquire(&d, ".lock").err().unwrap().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        drop(held);
        // the file is left behind with a PID in it, as after a crash: it is taken over
        assert!(std::fs::read_to_string(d.join(".lock")).unwrap().trim().parse::<u32>().is_ok());
        let again = FolderLock::acquire(&d, ".lock").unwrap();
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_text_file_that_is_not_utf8_names_its_line_and_column() {
        let d = tmp("utf8");
        let p = d.join("texts.txt");
        std::fs::write(&p, b"fine\nalso fine\nbad \xff here\n").unwrap();
        let e = read_text_file(&p).unwrap_err().to_string();
        assert!(e.ends_with("texts.txt:3: invalid UTF-8: byte 0xff at column 5 (expected UTF-8 text)"), "{e}");
        std::fs::write(&p, "ünïcode\n").unwrap();
        assert_eq!(read_text_file(&p).unwrap(), "ünïcode\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn atomic_write_replaces_whole_files() {
        let d = tmp("atomic");
        let p = d.join("stage.json");
        write_file_atomic(&p, b"one").unwrap();
        write_file_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "no temporary file is left");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
