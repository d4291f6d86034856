//! Volume files and mount symlinks on the host file system.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::plan::VolumeFile;

/// Makes `dir` hold exactly `files`: each changed file is written to a
/// temporary name and renamed over the old one (so a reader sees the old or
/// the new content, never a mix); files no longer listed are removed.
pub(crate) fn write_files(dir: &Path, files: &[VolumeFile]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut wanted = HashSet::new();
    for file in files {
        let dest = dir.join(&file.path);
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            continue;
        };
        fs::create_dir_all(parent)?;
        wanted.insert(dest.clone());
        let unchanged = fs::symlink_metadata(&dest)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o7777 == file.mode)
            && fs::read(&dest).is_ok_and(|data| data == file.data);
        if unchanged {
            continue;
        }
        // Created with its final mode (a secret is never readable by
        // others, not even for a moment), then set exactly (the umask may
        // have taken bits away).
        let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(file.mode)
                .open(&tmp)?;
            f.write_all(&file.data)?;
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(file.mode))?;
        fs::rename(&tmp, &dest)?;
    }
    remove_unwanted(dir, &wanted)?;
    Ok(())
}

/// Removes files under `dir` that are not in `wanted`, and directories that
/// become empty.
fn remove_unwanted(dir: &Path, wanted: &HashSet<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            remove_unwanted(&path, wanted)?;
            // Fails (and is kept) unless empty.
            let _ = fs::remove_dir(&path);
        } else if !wanted.contains(&path) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Makes `target` a symlink to `source`. Returns whether a link was created.
///
/// `create_parents`: missing parent directories of `target` are created.
/// `replace_links`: an existing symlink pointing elsewhere is replaced
/// (only for targets Edged owns). Anything else already at `target` is left
/// alone and reported.
pub(crate) fn expose_mount(
    source: &Path,
    target: &Path,
    create_parents: bool,
    replace_links: bool,
) -> Result<bool, String> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_symlink() => {
            if fs::read_link(target).is_ok_and(|l| l == source) {
                return Ok(false);
            }
            if !replace_links {
                return Err("a symlink to elsewhere already exists there".into());
            }
            fs::remove_file(target).map_err(|e| e.to_string())?;
        }
        Ok(_) => return Err("something already exists there".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    if create_parents && let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::os::unix::fs::symlink(source, target).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Removes `path` recursively; a missing path is fine.
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Gives `path` and everything under it to `uid`:`gid` (symlinks
/// themselves, never what they point to; modes unchanged).
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
