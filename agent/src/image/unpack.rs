//! Layer extraction: turns one layer blob (tar, gzip or zstd, detected by
//! magic bytes) into a directory that overlayfs can use as a lowerdir.
//!
//! Entries are written one by one, never through a symlink: every parent
//! component of an entry is checked with `lstat` and must be a real directory
//! inside the layer (missing ones are created), so no entry — whatever the
//! symlinks earlier in the archive point at — can write outside the layer.
//! `..` components and hardlinks whose target leaves the layer are refused.
//! OCI whiteouts become overlay whiteouts: `.wh.NAME` a `0:0` character
//! device, `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on its
//! directory, which hides lower layers only and keeps the directory's other
//! entries in this layer. Modes, ownership, mtimes and non-`trusted.` xattrs
//! are preserved; device nodes are skipped.
//!
//! A layer is unpacked into a temporary sibling directory and renamed into
//! place when complete, so a crash never leaves a half layer that looks done.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use tar::EntryType;

/// The xattr overlayfs reads to make a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Most bytes one layer may unpack to, and most entries: a layer bigger
/// than this is refused rather than filling the node's disk (a small
/// compressed blob can expand without bound, sparse entries too).
pub const MAX_LAYER_BYTES: u64 = 32 << 30;
pub const MAX_LAYER_ENTRIES: u64 = 2_000_000;
/// Most bytes a layer's stream may carry after the end of its tar archive.
/// They count towards the diff id, so they are read, but nothing bounded
/// them: a small gzip or zstd blob of a tiny archive followed by terabytes
/// of zeros kept a core busy hashing for hours. Tar writers pad to their
/// record size (10 KiB by default, 1 MiB at `tar -b 2048`).
pub const MAX_TRAILER_BYTES: u64 = 64 << 20;

/// Why a layer could not be unpacked (turned into `ImageError::Unpack` by
/// the caller, which knows the layer's digest).
#[derive(Debug)]
pub struct UnpackError(pub String);

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(msg: impl Into<String>) -> UnpackError {
    UnpackError(msg.into())
}

fn io_err(what: &str, path: &Path, e: io::Error) -> UnpackError {
    UnpackError(format!("{what} {}: {e}", path.display()))
}

/// Counts of what an unpack did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub skipped_devices: u64,
}

/// Unpacks the layer blob at `blob` into `dest` (which must not exist yet)
/// via a temporary sibling directory. Returns the layer's diff id
/// (`sha256:` of the uncompressed tar); when `expected_diff_id` is given and
/// differs, the layer is refused and nothing is left behind.
pub fn unpack_layer_file(
    blob: &Path,
    dest: &Path,
    expected_diff_id: Option<&str>,
) -> Result<String, UnpackError> {
    unpack_layer_file_within(blob, dest, expected_diff_id, MAX_TRAILER_BYTES)
}

/// [`unpack_layer_file`] with `max_trailer` bytes allowed after the archive.
fn unpack_layer_file_within(
    blob: &Path,
    dest: &Path,
    expected_diff_id: Option<&str>,
    max_trailer: u64,
) -> Result<String, UnpackError> {
    let parent = dest
        .parent()
        .ok_or_else(|| err("layer destination has no parent"))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".tmp-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        let file = fs::File::open(blob).map_err(|e| io_err("open", blob, e))?;
        let mut hashing =
            HashingReader::new(decompress(BufReader::with_capacity(256 * 1024, file))?);
        unpack_tar(&mut hashing, &tmp)?;
        let trailer = io::copy(&mut (&mut hashing).take(max_trailer + 1), &mut io::sink())
            .map_err(|e| err(format!("read layer: {e}")))?;
        if trailer > max_trailer {
            return Err(err(format!(
                "the layer goes on for more than {} MiB after the end of its tar archive \
                 (Skiff's limit); the image is malformed",
                max_trailer >> 20
            )));
        }
        let diff_id = hashing.digest();
        if let Some(expected) = expected_diff_id {
            if expected != diff_id {
                return Err(err(format!(
                    "diff id mismatch: expected {expected}, got {diff_id}"
                )));
            }
        }
        match fs::rename(&tmp, dest) {
            Ok(()) => Ok(diff_id),
            // Another unpacker finished the same layer first.
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(diff_id)
            }
            Err(e) => Err(io_err("rename layer to", dest, e)),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Wraps `input` in the decompressor its first bytes call for.
fn decompress<R: BufRead + Send + 'static>(
    mut input: R,
) -> Result<Box<dyn Read + Send>, UnpackError> {
    let head = input
        .fill_buf()
        .map_err(|e| err(format!("read layer: {e}")))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(input)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(ZstdFrames::new(input)))
    } else {
        Ok(Box::new(input))
    }
}

/// A zstd decoder over every frame of the input (ruzstd's streaming decoder
/// reads one frame).
struct ZstdFrames<R: BufRead> {
    source: Option<R>,
    decoder: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            source: Some(source),
            decoder: None,
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Bounded: each iteration either returns or consumes a whole frame.
        loop {
            if let Some(decoder) = self.decoder.as_mut() {
                let n = decoder.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                let decoder = self.decoder.take().expect("decoder present");
                self.source = Some(decoder.into_inner());
            }
            let mut source = match self.source.take() {
                Some(source) => source,
                None => return Ok(0),
            };
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let decoder = ruzstd::decoding::StreamingDecoder::new(source)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            self.decoder = Some(decoder);
        }
    }
}

/// Computes the sha256 of everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn digest(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Directory metadata applied after all entries, deepest first, so creating
/// children does not disturb a directory's mtime or write permission.
struct DirMeta {
    /// Relative to the layer root: walked again, through real directories
    /// only, when the metadata is applied.
    rel: PathBuf,
    mode: u32,
    mtime: u64,
}

/// Applies a directory's deferred mode and mtime, but only if `rel` still
/// is a real directory reached through real directories: a later entry may
/// have replaced it (or a parent) with a symlink to anywhere, and chmod
/// must never follow one out of the layer.
fn apply_dir_meta(root: &Path, dir: &DirMeta) -> Result<(), UnpackError> {
    let Ok(path) = prepare_parents(root, &dir.rel, false) else {
        return Ok(());
    };
    let handle = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(handle) => handle,
        // Replaced by a symlink (ELOOP), a file (ENOTDIR) or removed.
        Err(_) => return Ok(()),
    };
    handle
        .set_permissions(fs::Permissions::from_mode(dir.mode))
        .map_err(|e| io_err("chmod", &path, e))?;
    handle
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(dir.mtime))
        .map_err(|e| io_err("set mtime of", &path, e))
}

/// Counts what a layer writes, refusing past [`MAX_LAYER_BYTES`].
struct Budget {
    left: u64,
}

impl Budget {
    fn take(&mut self, n: u64) -> Result<(), UnpackError> {
        self.left = self.left.checked_sub(n).ok_or_else(|| {
            err(format!(
                "the layer unpacks to more than {} GiB; Skiff refuses layers this large",
                MAX_LAYER_BYTES >> 30
            ))
        })?;
        Ok(())
    }
}

/// Extracts an uncompressed tar stream into the existing directory `root`.
pub fn unpack_tar(input: impl Read, root: &Path) -> Result<UnpackStats, UnpackError> {
    unpack_tar_within(input, root, MAX_LAYER_BYTES)
}

/// [`unpack_tar`] with a smaller byte budget than [`MAX_LAYER_BYTES`]: the
/// fuzz targets' tiny archives can claim gigabytes of sparse holes.
#[doc(hidden)]
pub fn unpack_tar_within(
    input: impl Read,
    root: &Path,
    max_bytes: u64,
) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(input);
    let mut stats = UnpackStats::default();
    let mut dirs: Vec<DirMeta> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| err(format!("read tar: {e}")))?;
    let mut budget = Budget { left: max_bytes };
    for entry in entries {
        let mut entry = entry.map_err(|e| err(format!("read tar entry: {e}")))?;
        stats.entries += 1;
        if stats.entries > MAX_LAYER_ENTRIES {
            return Err(err(format!(
                "the layer has more than {MAX_LAYER_ENTRIES} entries; Skiff refuses layers this large"
            )));
        }
        unpack_entry(&mut entry, root, &mut stats, &mut dirs, &mut budget)?;
    }
    for dir in dirs.iter().rev() {
        apply_dir_meta(root, dir)?;
    }
    Ok(stats)
}

/// Normalizes an archive path to components inside the layer: leading `/`
/// and `.` are dropped, `..` is refused.
pub fn layer_relative(raw: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                return Err(err(format!(
                    "entry {} escapes the layer (`..`)",
                    raw.display()
                )))
            }
            Component::Prefix(_) => return Err(err(format!("bad entry path {}", raw.display()))),
        }
    }
    Ok(out)
}

/// Makes sure every parent of `rel` is a real directory under `root`,
/// creating missing ones; refuses a symlink or non-directory on the way.
/// Returns the absolute path of `rel`.
fn prepare_parents(root: &Path, rel: &Path, create: bool) -> Result<PathBuf, UnpackError> {
    let mut current = root.to_path_buf();
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        current.push(component);
        if components.peek().is_none() {
            break;
        }
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(err(format!(
                    "entry {} would be written through the symlink {}",
                    rel.display(),
                    current.strip_prefix(root).unwrap_or(&current).display()
                )))
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(err(format!(
                    "entry {}: parent {} is not a directory",
                    rel.display(),
                    current.strip_prefix(root).unwrap_or(&current).display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&current)
                    .map_err(|e| io_err("create", &current, e))?;
            }
            Err(e) => return Err(io_err("stat", &current, e)),
        }
    }
    Ok(current)
}

/// Clears the way for a new entry at `path`: anything there is removed,
/// except a real directory when a directory is coming (tar semantics).
/// Returns whether a directory was kept.
fn clear_target(path: &Path, keep_dir: bool) -> Result<bool, UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            if keep_dir {
                return Ok(true);
            }
            fs::remove_dir_all(path).map_err(|e| io_err("remove", path, e))?;
        }
        Ok(_) => fs::remove_file(path).map_err(|e| io_err("remove", path, e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", path, e)),
    }
    Ok(false)
}

fn set_mtime(path: &Path, mtime: u64) -> Result<(), UnpackError> {
    let ts = TimeSpec::from_duration(Duration::from_secs(mtime));
    utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| err(format!("set mtime of {}: {e}", path.display())))
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), UnpackError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| io_err("chown", path, e))
}

struct Owner {
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Ownership from the header, overridden by PAX `uid`/`gid`; xattrs from
/// PAX `SCHILY.xattr.*`, except `trusted.*` (which includes overlayfs'
/// own attributes: a layer must not smuggle in opaque or redirect markers).
fn owner_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Owner, UnpackError> {
    let header = entry.header();
    let mut owner = Owner {
        uid: header.uid().unwrap_or(0) as u32,
        gid: header.gid().unwrap_or(0) as u32,
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| err(format!("read pax header: {e}")))?
    {
        for ext in extensions.flatten() {
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            match key {
                "uid" => {
                    if let Some(v) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                        owner.uid = v;
                    }
                }
                "gid" => {
                    if let Some(v) = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()) {
                        owner.gid = v;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        if !name.starts_with("trusted.") {
                            owner.xattrs.push((name.to_string(), value.to_vec()));
                        }
                    }
                }
            }
        }
    }
    Ok(owner)
}

fn apply_xattrs(path: &Path, xattrs: &[(String, Vec<u8>)]) {
    for (name, value) in xattrs {
        if let Err(e) = xattr::set(path, name, value) {
            tracing::debug!(path = %path.display(), %name, error = %e, "xattr not applied");
        }
    }
}

fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    root: &Path,
    stats: &mut UnpackStats,
    dirs: &mut Vec<DirMeta>,
    budget: &mut Budget,
) -> Result<(), UnpackError> {
    let raw_path = entry
        .path()
        .map_err(|e| err(format!("bad entry path: {e}")))?
        .into_owned();
    let rel = layer_relative(&raw_path)?;
    let kind = entry.header().entry_type();
    if rel.as_os_str().is_empty() {
        // The layer root itself ("./"): its metadata belongs to the image's
        // "/", which the runtime owns.
        return Ok(());
    }
    let file_name = rel
        .file_name()
        .map(OsStr::as_bytes)
        .unwrap_or_default()
        .to_vec();

    if file_name == OPAQUE_MARKER.as_bytes() {
        // The marker's directory is a parent like any other: created when
        // missing, refused when it is a symlink.
        let marker = prepare_parents(root, &rel, true)?;
        let dir = marker.parent().unwrap_or(root).to_path_buf();
        xattr::set(&dir, OPAQUE_XATTR, b"y").map_err(|e| io_err("set opaque xattr on", &dir, e))?;
        stats.opaque_dirs += 1;
        return Ok(());
    }
    if file_name.starts_with(b".wh..wh.") {
        // Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not content.
        return Ok(());
    }
    if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(err(format!("bad whiteout entry {}", rel.display())));
        }
        let target_rel = rel.with_file_name(OsStr::from_bytes(hidden));
        let target = prepare_parents(root, &target_rel, true)?;
        // A whiteout hides lower layers only: if this layer already holds
        // the name, that entry hides the lower one and stays.
        if fs::symlink_metadata(&target).is_ok() {
            return Ok(());
        }
        mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| err(format!("create whiteout {}: {e}", target.display())))?;
        stats.whiteouts += 1;
        return Ok(());
    }

    let owner = owner_of(entry)?;
    let header = entry.header();
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    let mtime = header.mtime().unwrap_or(0);
    let path = prepare_parents(root, &rel, true)?;

    match kind {
        EntryType::Directory => {
            if !clear_target(&path, true)? {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| io_err("create", &path, e))?;
            }
            lchown(&path, owner.uid, owner.gid)?;
            apply_xattrs(&path, &owner.xattrs);
            dirs.push(DirMeta { rel, mode, mtime });
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            clear_target(&path, false)?;
            // create_new: O_CREAT|O_EXCL never follows a symlink.
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_err("create", &path, e))?;
            // The size the entry claims is checked first, then what is read
            // (a sparse entry expands to its real size as it is read).
            let claimed = entry.header().size().unwrap_or(0);
            budget.take(claimed)?;
            let limit = budget.left.saturating_add(claimed).saturating_add(1);
            let written = io::copy(&mut (&mut *entry).take(limit), &mut file)
                .map_err(|e| io_err("write", &path, e))?;
            budget.take(written.saturating_sub(claimed))?;
            std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
                .map_err(|e| io_err("chown", &path, e))?;
            // After chown, which clears setuid/setgid bits.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| io_err("chmod", &path, e))?;
            apply_xattrs(&path, &owner.xattrs);
            file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
                .map_err(|e| io_err("set mtime of", &path, e))?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| err(format!("bad symlink target: {e}")))?
                .ok_or_else(|| err(format!("symlink {} without target", rel.display())))?
                .into_owned();
            clear_target(&path, false)?;
            // Kept verbatim (absolute ones too): it is resolved inside the
            // container's rootfs, never by us.
            std::os::unix::fs::symlink(&target, &path).map_err(|e| io_err("symlink", &path, e))?;
            lchown(&path, owner.uid, owner.gid)?;
            set_mtime(&path, mtime)?;
        }
        EntryType::Link => {
            let raw_target = entry
                .link_name()
                .map_err(|e| err(format!("bad hardlink target: {e}")))?
                .ok_or_else(|| err(format!("hardlink {} without target", rel.display())))?
                .into_owned();
            let target_rel = layer_relative(&raw_target).map_err(|_| {
                err(format!(
                    "hardlink {} points outside the layer ({})",
                    rel.display(),
                    raw_target.display()
                ))
            })?;
            let not_here = || {
                err(format!(
                    "hardlink {} points to {}, which is not a file in this layer",
                    rel.display(),
                    raw_target.display()
                ))
            };
            let target = match prepare_parents(root, &target_rel, false) {
                Ok(target) => target,
                Err(e) if e.0.contains("symlink") => {
                    return Err(err(format!("hardlink {}: {e}", rel.display())))
                }
                Err(_) => return Err(not_here()),
            };
            match fs::symlink_metadata(&target) {
                Ok(meta) if !meta.is_dir() => {}
                _ => return Err(not_here()),
            }
            if target == path {
                return Ok(());
            }
            clear_target(&path, false)?;
            // link(2) does not follow a symlink source: the link stays in the layer.
            fs::hard_link(&target, &path).map_err(|e| io_err("hardlink", &path, e))?;
        }
        EntryType::Fifo => {
            clear_target(&path, false)?;
            nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
                .map_err(|e| err(format!("mkfifo {}: {e}", path.display())))?;
            lchown(&path, owner.uid, owner.gid)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|e| io_err("chmod", &path, e))?;
            set_mtime(&path, mtime)?;
        }
        EntryType::Char | EntryType::Block => {
            // Containers get their /dev from the runtime.
            stats.skipped_devices += 1;
        }
        _ => {
            tracing::debug!(path = %rel.display(), ?kind, "skipping tar entry of unsupported type");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar built entry by entry with raw names, so malicious paths that
    /// `tar::Builder` would refuse can be written.
    #[derive(Default)]
    struct Tar(Vec<u8>);

    impl Tar {
        fn entry(
            mut self,
            name: &str,
            kind: EntryType,
            link: &str,
            data: &[u8],
            mode: u32,
        ) -> Self {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_000_000);
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0u8, pad));
            self
        }
        fn file(self, name: &str, data: &str) -> Self {
            self.entry(name, EntryType::Regular, "", data.as_bytes(), 0o644)
        }
        fn dir(self, name: &str) -> Self {
            self.entry(name, EntryType::Directory, "", b"", 0o755)
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Symlink, target, b"", 0o777)
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.entry(name, EntryType::Link, target, b"", 0o644)
        }
        fn bytes(mut self) -> Vec<u8> {
            self.0.extend(std::iter::repeat_n(0u8, 1024));
            self.0
        }
    }

    struct Sandbox {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn sandbox() -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("layer");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("victim"), "original").unwrap();
        Sandbox {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn unpack(s: &Sandbox, tar: Tar) -> Result<UnpackStats, UnpackError> {
        unpack_tar(&tar.bytes()[..], &s.root)
    }

    fn outside_untouched(s: &Sandbox) {
        assert_eq!(
            fs::read_to_string(s.outside.join("victim")).unwrap(),
            "original"
        );
        assert_eq!(fs::read_dir(&s.outside).unwrap().count(), 1);
    }

    /// A directory x (mode 04777) replaced later in the layer by a symlink
    /// x -> a host path: the deferred chmod of x must not follow it and
    /// make the host file setuid and world-writable.
    #[test]
    fn a_directory_replaced_by_a_symlink_never_passes_its_mode_to_the_host() {
        let s = sandbox();
        let victim = s.outside.join("victim");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let tar = Tar::default()
            .entry("x", EntryType::Directory, "", b"", 0o4777)
            .symlink("x", victim.to_str().unwrap());
        unpack(&s, tar).unwrap();
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644, "the host file's mode changed to {mode:o}");
        outside_untouched(&s);
        // Through a replaced parent too: a/b's mode must not reach outside/b.
        let s = sandbox();
        fs::create_dir(s.outside.join("b")).unwrap();
        fs::set_permissions(s.outside.join("b"), fs::Permissions::from_mode(0o755)).unwrap();
        let tar = Tar::default()
            .entry("a", EntryType::Directory, "", b"", 0o755)
            .entry("a/b", EntryType::Directory, "", b"", 0o4777)
            .symlink("a", s.outside.to_str().unwrap());
        unpack(&s, tar).unwrap();
        let mode = fs::metadata(s.outside.join("b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o755, "a directory outside changed to {mode:o}");
    }

    #[test]
    fn a_layer_with_too_many_bytes_is_refused() {
        let mut budget = Budget { left: 10 };
        assert!(budget.take(10).is_ok());
        let e = budget.take(1).unwrap_err();
        assert!(e.0.contains("GiB"), "{e}");
    }

    #[test]
    fn dotdot_paths_are_refused() {
        let s = sandbox();
        let e = unpack(&s, Tar::default().file("../outside/victim", "pwned")).unwrap_err();
        assert!(e.0.contains("escapes the layer"), "{e}");
        let e = unpack(&s, Tar::default().file("a/../../outside/new", "pwned")).unwrap_err();
        assert!(e.0.contains("escapes the layer"), "{e}");
        outside_untouched(&s);
    }

    #[test]
    fn writes_through_an_escaping_symlink_are_refused() {
        for target in ["../outside", "/nonexistent-but-absolute"] {
            let s = sandbox();
            let target = if target.starts_with('/') {
                s.outside.to_str().unwrap().to_string()
            } else {
                target.to_string()
            };
            let tar = Tar::default()
                .symlink("escape", &target)
                .file("escape/victim", "pwned");
            let e = unpack(&s, tar).unwrap_err();
            assert!(e.0.contains("through the symlink"), "{e}");
            outside_untouched(&s);
        }
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
        let s = sandbox();
        let victim = s.outside.join("victim");
        let tar = Tar::default()
            .symlink("f", victim.to_str().unwrap())
            .file("f", "mine");
        unpack(&s, tar).unwrap();
        outside_untouched(&s);
        let meta = fs::symlink_metadata(s.root.join("f")).unwrap();
        assert!(meta.is_file());
        assert_eq!(fs::read_to_string(s.root.join("f")).unwrap(), "mine");
    }

    #[test]
    fn absolute_symlinks_are_kept_verbatim() {
        let s = sandbox();
        unpack(
            &s,
            Tar::default().dir("bin").symlink("bin/sh", "/bin/busybox"),
        )
        .unwrap();
        assert_eq!(
            fs::read_link(s.root.join("bin/sh")).unwrap(),
            PathBuf::from("/bin/busybox")
        );
    }

    #[test]
    fn hardlinks_to_outside_the_layer_are_refused() {
        let s = sandbox();
        let e = unpack(&s, Tar::default().hardlink("h", "../outside/victim")).unwrap_err();
        assert!(e.0.contains("outside the layer"), "{e}");
        // Absolute names are layer-relative: /etc/passwd is not in this layer.
        let e = unpack(&s, Tar::default().hardlink("h", "/etc/passwd")).unwrap_err();
        assert!(e.0.contains("not a file in this layer"), "{e}");
        // Nor may a hardlink reach out through a symlinked directory.
        let tar = Tar::default()
            .symlink("d", s.outside.to_str().unwrap())
            .hardlink("h", "d/victim");
        let e = unpack(&s, tar).unwrap_err();
        assert!(e.0.contains("symlink"), "{e}");
        assert!(!s.root.join("h").exists());
        assert_eq!(fs::metadata(s.outside.join("victim")).unwrap().nlink(), 1);
    }

    #[test]
    fn hardlinks_inside_the_layer_work() {
        let s = sandbox();
        unpack(&s, Tar::default().file("a", "same").hardlink("b", "a")).unwrap();
        assert_eq!(fs::metadata(s.root.join("b")).unwrap().nlink(), 2);
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let s = sandbox();
        let stats = unpack(&s, Tar::default().dir("etc").file("etc/.wh.motd", "")).unwrap();
        assert_eq!(stats.whiteouts, 1);
        let meta = fs::symlink_metadata(s.root.join("etc/motd")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), 0);
        assert!(!s.root.join("etc/.wh.motd").exists());
    }

    #[test]
    fn opaque_marker_hides_lower_layers_only() {
        let s = sandbox();
        let tar = Tar::default()
            .dir("data")
            .file("data/before", "1")
            .file("data/.wh..wh..opq", "")
            .file("data/after", "2");
        let stats = unpack(&s, tar).unwrap();
        assert_eq!(stats.opaque_dirs, 1);
        let dir = s.root.join("data");
        assert_eq!(
            xattr::get(&dir, OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        // Files of the same layer stay, before and after the marker.
        assert_eq!(fs::read_to_string(dir.join("before")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dir.join("after")).unwrap(), "2");
        assert!(!dir.join(".wh..wh..opq").exists());
    }

    #[test]
    fn layers_cannot_smuggle_overlay_xattrs() {
        let s = sandbox();
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_path("d").unwrap();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_cksum();
        builder.append(&h, &[][..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        unpack_tar(&bytes[..], &s.root).unwrap();
        assert_eq!(xattr::get(s.root.join("d"), OPAQUE_XATTR).unwrap(), None);
    }

    #[test]
    fn modes_ownership_and_mtimes_are_preserved() {
        let s = sandbox();
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_path("priv").unwrap();
        h.set_mode(0o700);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(42);
        h.set_size(0);
        h.set_cksum();
        builder.append(&h, &[][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_path("priv/suid").unwrap();
        h.set_mode(0o4755);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(4242);
        h.set_size(2);
        h.set_cksum();
        builder.append(&h, &b"hi"[..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        unpack_tar(&bytes[..], &s.root).unwrap();
        let file = fs::metadata(s.root.join("priv/suid")).unwrap();
        assert_eq!(file.mode() & 0o7777, 0o4755);
        assert_eq!((file.uid(), file.gid(), file.mtime()), (1234, 5678, 4242));
        let dir = fs::metadata(s.root.join("priv")).unwrap();
        assert_eq!(dir.mode() & 0o7777, 0o700);
        assert_eq!((dir.uid(), dir.gid(), dir.mtime()), (1234, 5678, 42));
    }

    fn layer_blob(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn gzip_zstd_and_plain_layers_unpack_with_their_diff_id() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = Tar::default().dir("etc").file("etc/hello", "world").bytes();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = ruzstd::encoding::compress_to_vec(
            &tar[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        for (name, bytes) in [("plain", tar.clone()), ("gz", gz), ("zst", zst)] {
            let blob = layer_blob(tmp.path(), &format!("{name}.blob"), &bytes);
            let dest = tmp.path().join(name);
            let got = unpack_layer_file(&blob, &dest, Some(&diff_id)).unwrap();
            assert_eq!(got, diff_id);
            assert_eq!(fs::read_to_string(dest.join("etc/hello")).unwrap(), "world");
        }
    }

    /// A tiny archive followed by endless zeros compresses to almost
    /// nothing; hashing the zeros for the diff id is bounded.
    #[test]
    fn bytes_after_the_archive_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let mut stream = Tar::default().file("ok", "1").bytes();
        stream.extend(std::iter::repeat_n(0u8, 3 << 20));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&stream).unwrap();
        let blob = layer_blob(tmp.path(), "long.blob", &gz.finish().unwrap());
        let dest = tmp.path().join("layers").join("long");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let e = unpack_layer_file_within(&blob, &dest, None, 2 << 20).unwrap_err();
        assert!(
            e.0.contains("more than 2 MiB after the end of its tar archive"),
            "{e}"
        );
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 0);
        // Within the limit, the same stream unpacks with its diff id.
        let got = unpack_layer_file_within(&blob, &dest, None, 4 << 20).unwrap();
        assert_eq!(
            got,
            format!("sha256:{}", hex::encode(Sha256::digest(&stream)))
        );
    }

    #[test]
    fn a_refused_layer_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let tar = Tar::default().file("ok", "1").file("../bad", "2").bytes();
        let blob = layer_blob(tmp.path(), "bad.blob", &tar);
        let dest = tmp.path().join("layers").join("bad");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        assert!(unpack_layer_file(&blob, &dest, None).is_err());
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 0);

        let good = Tar::default().file("ok", "1").bytes();
        let blob = layer_blob(tmp.path(), "good.blob", &good);
        let e = unpack_layer_file(&blob, &dest, Some("sha256:0000")).unwrap_err();
        assert!(e.0.contains("diff id mismatch"), "{e}");
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 0);
    }
}
