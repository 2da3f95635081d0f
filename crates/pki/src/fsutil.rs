//! File helpers: private directories, atomic writes with explicit modes, friendly errors.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates, CRLs and other public files.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode of the directories holding keys.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` with mode 0700 (parents with the default mode) unless it exists.
/// Returns whether it was created.
pub(crate) fn create_private_dir(dir: &Path) -> Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    if dir.exists() {
        bail!("{}: exists but is not a directory", dir.display());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create directory", parent.display()))?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("{}: cannot create directory", dir.display()))
        }
    }
    // The umask may have removed bits we asked for; set the mode exactly.
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
        .with_context(|| format!("{}: cannot set mode 0700", dir.display()))?;
    Ok(true)
}

/// Writes a new file atomically (temp file in the same directory, then link into place).
/// Fails if `path` already exists; never overwrites.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    let result = match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists || path.exists() => Err(anyhow!(
            "{}: already exists; not overwriting it",
            path.display()
        )),
        // File systems without hard links: rename instead (a tiny race, acceptable here).
        Err(_) => {
            fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
        }
    };
    // After a link (or a failure) the temp name is still there; after a rename it is gone.
    let _ = fs::remove_file(&tmp);
    result?;
    sync_parent(path);
    Ok(())
}

/// Replaces (or creates) `path` atomically: temp file in the same directory, then rename.
pub(crate) fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = write_temp(path, contents, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot replace", path.display()));
    }
    sync_parent(path);
    Ok(())
}

/// Reads a file; a missing file gets an error telling the user to run `init` first.
pub(crate) fn read_pki_file(path: &Path, pki_dir: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "{}: no such file; run `bulwark-pki init --dir {}` first",
            path.display(),
            pki_dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// The permission bits of `path`.
pub(crate) fn mode_of(path: &Path) -> Result<u32> {
    let meta = fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
    Ok(meta.permissions().mode() & 0o7777)
}

fn write_temp(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write = |file: &mut File| -> io::Result<()> {
        file.write_all(contents)?;
        // Exact mode regardless of the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = write(&mut file) {
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", tmp.display()));
    }
    Ok(tmp)
}

/// Best effort: make the directory entry durable.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_never_overwrites_and_sets_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.key");
        write_new(&path, b"one", KEY_MODE).unwrap();
        assert_eq!(mode_of(&path).unwrap(), 0o600);
        let err = write_new(&path, b"two", KEY_MODE).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // No temp files left behind.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_overwrites_with_exact_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("crl.pem");
        replace(&path, b"one", PUBLIC_MODE).unwrap();
        replace(&path, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path).unwrap(), 0o644);
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dir_is_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs/dev");
        assert!(create_private_dir(&dir).unwrap());
        assert!(!create_private_dir(&dir).unwrap());
        assert_eq!(mode_of(&dir).unwrap(), 0o700);
    }
}
