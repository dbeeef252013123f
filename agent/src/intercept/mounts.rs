//! The mount table as the intercept needs it: which mount is on top of a path (from
//! `/proc/self/mountinfo`, which never sends a request to a FUSE server and so cannot
//! hang on a dead or stuck one), and `umount2`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One mount, from a line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// Mount id (unique while mounted).
    pub(super) id: u64,
    /// `major:minor` of the file system's device.
    pub(super) dev: String,
    /// File system type (`fuse` for ours).
    pub(super) fstype: String,
    /// Mount source (`boomerang` for ours).
    pub(super) source: String,
}

/// The mount on top of `path` (an absolute, canonical path), if `path` is a mount point.
pub(super) fn top_mount(path: &Path) -> io::Result<Option<MountEntry>> {
    let text = std::fs::read(MOUNTINFO)?;
    Ok(top_mount_in(&text, path.as_os_str().as_bytes()))
}

/// The last (topmost) entry of `mountinfo` mounted on `path`.
fn top_mount_in(mountinfo: &[u8], path: &[u8]) -> Option<MountEntry> {
    mountinfo
        .split(|&b| b == b'\n')
        .rev()
        .filter_map(parse_line)
        .find(|(mount_point, _)| mount_point == path)
        .map(|(_, entry)| entry)
}

/// `id parent major:minor root mount-point options [optional...] - fstype source super`
fn parse_line(line: &[u8]) -> Option<(Vec<u8>, MountEntry)> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let id = std::str::from_utf8(fields.first()?).ok()?.parse().ok()?;
    let dev = String::from_utf8_lossy(fields.get(2)?).into_owned();
    let mount_point = unescape(fields.get(4)?);
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fstype = String::from_utf8_lossy(fields.get(dash + 1)?).into_owned();
    let source = String::from_utf8_lossy(&unescape(fields.get(dash + 2)?)).into_owned();
    Some((
        mount_point,
        MountEntry {
            id,
            dev,
            fstype,
            source,
        },
    ))
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if let (b'\\', Some(digits)) = (field[i], field.get(i + 1..i + 4)) {
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// `umount2(path, flags)`.
pub(super) fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; umount2
    // reads it and touches no other memory of ours.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
25 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
80 25 0:50 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:40 - fuse boomerang rw,user_id=0,group_id=0
81 80 0:51 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse other rw,user_id=0,group_id=0
90 25 0:60 / /mnt rw,relatime shared:50 master:3 - tmpfs tmp\\040fs rw
";

    #[test]
    fn the_topmost_mount_on_a_path_is_found() {
        let top = top_mount_in(SAMPLE, b"/tmp/a b").expect("mounted");
        assert_eq!(top.id, 81, "the later mount is on top");
        assert_eq!(top.dev, "0:51");
        assert_eq!(top.fstype, "fuse");
        assert_eq!(top.source, "other");
        let tmpfs = top_mount_in(SAMPLE, b"/mnt").expect("mounted");
        assert_eq!((tmpfs.id, tmpfs.fstype.as_str()), (90, "tmpfs"));
        assert_eq!(
            tmpfs.source, "tmp fs",
            "optional fields skipped, source unescaped"
        );
        assert!(top_mount_in(SAMPLE, b"/tmp").is_none());
        assert!(top_mount_in(SAMPLE, b"/tmp/a\\040b").is_none());
    }

    #[test]
    fn escapes_and_garbage() {
        assert_eq!(unescape(b"a\\040b\\134c\\011"), b"a b\\c\t");
        assert_eq!(unescape(b"end\\04"), b"end\\04", "a short escape is kept");
        assert_eq!(unescape(b"\\999"), b"\\999");
        assert!(parse_line(b"").is_none());
        assert!(parse_line(b"x 1 0:1 / /a rw - t s").is_none());
        assert!(parse_line(b"1 1 0:1 / /a rw no-dash-here").is_none());
        assert!(top_mount_in(b"garbage\n\n1 2", b"/").is_none());
    }

    #[test]
    fn this_hosts_root_is_a_mount_point() {
        let root = top_mount(Path::new("/")).expect("read mountinfo");
        assert!(root.is_some(), "/ is always mounted");
    }
}
