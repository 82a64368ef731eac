//! The layer unpacker, over archives a registry could serve: it may refuse
//! them, but must neither panic nor write, chmod, chown, link or set an
//! xattr outside the layer directory. A checker walks the host side
//! (sentinel files, a directory, symlinks next to the layer) before and
//! after each unpack.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use skiff_agent::image::unpack::unpack_tar_within;
use tar::{EntryType, Header};

use crate::input::Input;

/// Bytes one fuzzed layer may write: enough for every entry, small enough
/// that a sparse header claiming gigabytes is refused at once.
const BUDGET: u64 = 1 << 20;

/// Byte 0 odd: the rest is the archive as it is. Even: the rest drives a
/// generator of archives full of traps (see [`archive`]).
pub fn tar_unpack(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let host = tmp.path();
    let layer = host.join("layer");
    lay_out_host(host);
    let before = walk(host);
    let bytes = if mode % 2 == 1 {
        rest.to_vec()
    } else {
        archive(&mut Input::new(rest), host)
    };
    let _ = unpack_tar_within(&bytes[..], &layer, BUDGET);
    let after = walk(host);
    if before != after {
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .map(|k| format!("{}: {:?} -> {:?}", k.display(), before.get(k), after.get(k)))
            .collect();
        panic!("the unpack changed the host side:\n{}", changed.join("\n"));
    }
}

/// What must stay as it is outside `layer/`: a file, a directory with a
/// file, a relative and an absolute symlink to them.
fn lay_out_host(host: &Path) {
    let write = |path: &Path, text: &str, mode: u32| {
        fs::write(path, text).expect("write a sentinel");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod a sentinel");
    };
    write(&host.join("sentinel.txt"), "the host's own file\n", 0o644);
    fs::create_dir(host.join("sentdir")).expect("create the sentinel directory");
    fs::set_permissions(host.join("sentdir"), fs::Permissions::from_mode(0o755))
        .expect("chmod the sentinel directory");
    write(&host.join("sentdir/inner.txt"), "inside\n", 0o600);
    symlink("sentdir", host.join("sentlink")).expect("symlink");
    symlink(host.join("sentinel.txt"), host.join("abslink")).expect("symlink");
    fs::create_dir(host.join("layer")).expect("create the layer directory");
}

/// One entry's observable state. `nlink` catches a hardlink made to a
/// sentinel from inside the layer.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    mtime: (i64, i64),
    content: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Everything under `host` except the layer's contents (the layer
/// directory itself is kept, without what its children change: nlink and
/// mtime).
fn walk(host: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut seen = BTreeMap::new();
    let mut stack = vec![host.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).expect("stat a host path");
        let is_layer = path == host.join("layer");
        let content = if meta.file_type().is_symlink() {
            fs::read_link(&path)
                .expect("readlink")
                .into_os_string()
                .into_encoded_bytes()
        } else if meta.is_file() {
            fs::read(&path).expect("read a host file")
        } else {
            Vec::new()
        };
        // The layer root may become opaque (`.wh..wh..opq` at the top).
        let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&path)
            .map(|names| {
                names
                    .map(|n| {
                        let value = xattr::get(&path, &n).ok().flatten().unwrap_or_default();
                        (n.to_string_lossy().into_owned(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.retain(|(name, _)| !(is_layer && name == "trusted.overlay.opaque"));
        xattrs.sort();
        seen.insert(
            path.clone(),
            Seen {
                kind: meta.mode() & 0o170000,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                nlink: if is_layer || meta.is_dir() {
                    0
                } else {
                    meta.nlink()
                },
                mtime: if is_layer || path == host {
                    (0, 0)
                } else {
                    (meta.mtime(), meta.mtime_nsec())
                },
                content,
                xattrs,
            },
        );
        if meta.is_dir() && !is_layer {
            for item in fs::read_dir(&path).expect("list a host directory") {
                stack.push(item.expect("a directory entry").path());
            }
        }
    }
    seen
}

/// Builds an archive from choices: names that collide (a directory then a
/// symlink of the same name), climb (`..`), are absolute or overlong;
/// symlinks and hardlinks to the host's sentinels (relative and absolute);
/// setuid modes, whiteouts, opaque markers, devices, FIFOs, PAX records
/// (paths, owners, xattrs incl. overlayfs' own), GNU long names, sparse
/// entries and sizes the data does not have.
fn archive(input: &mut Input, host: &Path) -> Vec<u8> {
    let host_text = host.display().to_string();
    let names: Vec<Vec<u8>> = [
        "x",
        "x/y",
        "x/y/z",
        "d",
        "d/f",
        "lnk",
        "lnk/f",
        "lnk/sub/f",
        "../sentinel.txt",
        "../sentdir/inner.txt",
        "../sentdir/new",
        "../sentlink/inner.txt",
        "/abs",
        "/x",
        "./x",
        "x/../y",
        "x/./y",
        ".",
        "./",
        "..",
        ".wh.x",
        "x/.wh.y",
        ".wh..wh..opq",
        "x/.wh..wh..opq",
        "lnk/.wh..wh..opq",
        "lnk/.wh.z",
        ".wh.",
        ".wh..",
        ".wh..wh.plnk",
        "a/b/c/d/e",
        "dotdot/../../x",
        "x/",
        "lnk/",
        "d/f/g",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        format!("{host_text}/sentinel.txt").into_bytes(),
        format!("{}/f", "long".repeat(30)).into_bytes(),
    ])
    .collect();
    let targets: Vec<Vec<u8>> = [
        "x",
        "x/y",
        "d",
        "d/f",
        "..",
        "../",
        "../sentinel.txt",
        "../sentdir",
        "../sentdir/inner.txt",
        "../../",
        "../../../../../../../../tmp",
        "/",
        "/etc/passwd",
        "lnk",
        "lnk/f",
        "",
        "./x",
        "sentdir",
        "../layer/x",
        "../sentlink",
        "../abslink",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([
        format!("{host_text}/sentinel.txt").into_bytes(),
        format!("{host_text}/sentdir").into_bytes(),
        format!("{host_text}/sentdir/inner.txt").into_bytes(),
        host_text.clone().into_bytes(),
    ])
    .collect();
    let modes = [
        0o644, 0o755, 0o4777, 0o2755, 0o7777, 0o000, 0o777, 0o1777, 0o600,
    ];
    let mut out = Vec::new();
    let count = 1 + input.byte() % 12;
    for _ in 0..count {
        if input.is_empty() {
            break;
        }
        let name = match input.byte() {
            0..=239 => names[input.byte() as usize % names.len()].clone(),
            _ => input.bytes(120).to_vec(),
        };
        let link = match input.byte() {
            0..=239 => targets[input.byte() as usize % targets.len()].clone(),
            _ => input.bytes(120).to_vec(),
        };
        let kind = input.pick(&[
            EntryType::Directory,
            EntryType::Directory,
            EntryType::Regular,
            EntryType::Regular,
            EntryType::Symlink,
            EntryType::Symlink,
            EntryType::Link,
            EntryType::Link,
            EntryType::Char,
            EntryType::Block,
            EntryType::Fifo,
            EntryType::Continuous,
            EntryType::GNUSparse,
            EntryType::XHeader,
            EntryType::XGlobalHeader,
            EntryType::new(b'Z'),
        ]);
        let mode = match input.byte() % 8 {
            7 => input.u64() as u32,
            _ => input.pick(&modes),
        };
        let data = match kind {
            EntryType::XHeader | EntryType::XGlobalHeader => pax(input, &names, &targets),
            _ => input.bytes(64).to_vec(),
        };
        let claimed = match input.byte() % 16 {
            0 => Some(input.u64()),
            1 => Some(u64::MAX),
            2 => Some(8 << 30),
            _ => None,
        };
        let owner = input.pick(&[0, 0, 1000, 65534, u32::MAX as u64]);
        let mut sparse = [0u64; 9];
        if kind == EntryType::GNUSparse {
            for v in &mut sparse {
                *v = match input.byte() % 4 {
                    0 => input.u64(),
                    1 => 1 << 40,
                    _ => input.small().wrapping_mul(512),
                };
            }
        }
        entry(
            &mut out,
            &Planned {
                name: &name,
                link: &link,
                kind,
                mode,
                owner,
                data: &data,
                claimed,
                sparse,
            },
        );
    }
    if !input.byte().is_multiple_of(8) {
        out.extend(std::iter::repeat_n(0u8, 1024));
    }
    out
}

/// PAX records: paths and link paths (which override the header's),
/// owners, xattrs (overlayfs' `trusted.` ones must be dropped).
fn pax(input: &mut Input, names: &[Vec<u8>], targets: &[Vec<u8>]) -> Vec<u8> {
    let mut records = Vec::new();
    for _ in 0..1 + input.byte() % 3 {
        let (key, value): (&[u8], Vec<u8>) = match input.byte() % 8 {
            0 => (b"path", names[input.byte() as usize % names.len()].clone()),
            1 => (
                b"linkpath",
                targets[input.byte() as usize % targets.len()].clone(),
            ),
            2 => (b"uid", input.u64().to_string().into_bytes()),
            3 => (b"gid", b"4294967296".to_vec()),
            4 => (b"SCHILY.xattr.trusted.overlay.opaque", b"y".to_vec()),
            5 => (b"SCHILY.xattr.user.fuzz", input.bytes(16).to_vec()),
            6 => (b"size", input.u64().to_string().into_bytes()),
            _ => (
                b"SCHILY.xattr.security.capability",
                input.bytes(20).to_vec(),
            ),
        };
        // "LEN key=value\n", LEN counting itself.
        let body = key.len() + value.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        records.extend_from_slice(len.to_string().as_bytes());
        records.push(b' ');
        records.extend_from_slice(key);
        records.push(b'=');
        records.extend_from_slice(&value);
        records.push(b'\n');
    }
    records
}

struct Planned<'a> {
    name: &'a [u8],
    link: &'a [u8],
    kind: EntryType,
    mode: u32,
    owner: u64,
    data: &'a [u8],
    /// A size header the data does not have.
    claimed: Option<u64>,
    /// GNU sparse map: four (offset, length) pairs and the real size.
    sparse: [u64; 9],
}

/// Writes one raw entry, with GNU long-name entries before it when a name
/// does not fit (`tar::Builder` would refuse most of these names).
fn entry(out: &mut Vec<u8>, e: &Planned) {
    if e.name.len() > 100 {
        long(out, EntryType::GNULongName, e.name);
    }
    if e.link.len() > 100 {
        long(out, EntryType::GNULongLink, e.link);
    }
    let mut h = Header::new_gnu();
    let old = h.as_old_mut();
    let n = e.name.len().min(100);
    old.name[..n].copy_from_slice(&e.name[..n]);
    let n = e.link.len().min(100);
    old.linkname[..n].copy_from_slice(&e.link[..n]);
    h.set_entry_type(e.kind);
    h.set_mode(e.mode);
    number(&mut h.as_old_mut().uid, e.owner);
    number(&mut h.as_old_mut().gid, e.owner);
    h.set_mtime(1_000_000);
    number(
        &mut h.as_old_mut().size,
        e.claimed.unwrap_or(e.data.len() as u64),
    );
    if e.kind == EntryType::GNUSparse {
        let gnu = h.as_gnu_mut().expect("a GNU header");
        for (i, slot) in gnu.sparse.iter_mut().enumerate() {
            number(&mut slot.offset, e.sparse[2 * i]);
            number(&mut slot.numbytes, e.sparse[2 * i + 1]);
        }
        number(&mut gnu.realsize, e.sparse[8]);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(e.data);
    out.extend(std::iter::repeat_n(0u8, (512 - e.data.len() % 512) % 512));
}

fn long(out: &mut Vec<u8>, kind: EntryType, name: &[u8]) {
    let mut data = name.to_vec();
    data.push(0);
    entry(
        out,
        &Planned {
            name: b"././@LongLink",
            link: b"",
            kind,
            mode: 0o644,
            owner: 0,
            data: &data,
            claimed: None,
            sparse: [0; 9],
        },
    );
}

/// A tar number field: octal when it fits, else base-256 (GNU).
fn number(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let octal = format!("{value:0digits$o}");
    if octal.len() <= digits {
        field[..digits].copy_from_slice(octal.as_bytes());
        field[digits] = 0;
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let len = field.len();
        let n = bytes.len().min(len - 1);
        field[len - n..].copy_from_slice(&bytes[bytes.len() - n..]);
        field[0] |= 0x80;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_sees_every_kind_of_change_outside_the_layer() {
        let changes: [fn(&Path); 6] = [
            |host| {
                fs::set_permissions(host.join("sentdir"), fs::Permissions::from_mode(0o4777))
                    .unwrap()
            },
            |host| fs::hard_link(host.join("sentinel.txt"), host.join("layer/x")).unwrap(),
            |host| fs::write(host.join("sentdir/inner.txt"), "changed").unwrap(),
            |host| fs::write(host.join("sentdir/new"), "").unwrap(),
            |host| xattr::set(host.join("sentinel.txt"), "user.x", b"y").unwrap(),
            |host| {
                fs::remove_file(host.join("sentlink")).unwrap();
                symlink("/", host.join("sentlink")).unwrap();
            },
        ];
        for change in changes {
            let tmp = tempfile::tempdir().unwrap();
            lay_out_host(tmp.path());
            let before = walk(tmp.path());
            fs::write(tmp.path().join("layer/inside"), "fine").unwrap();
            assert_eq!(
                walk(tmp.path()),
                before,
                "the layer's contents are not watched"
            );
            change(tmp.path());
            assert_ne!(walk(tmp.path()), before);
        }
    }
}
