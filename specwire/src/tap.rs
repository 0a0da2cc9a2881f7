//! Opening a TAP interface, as the VMM's `tap=NAME` net backend and the
//! bridge's `--uplink tap=NAME` both do.
//!
//! [`open_tap`] opens the clone device `/dev/net/tun` (close-on-exec,
//! non-blocking) and attaches it with the `TUNSETIFF` ioctl as
//! `IFF_TAP | IFF_NO_PI`: each `read` returns one Ethernet frame and each
//! `write` sends one, with no packet-information header and no virtio-net
//! header (no `IFF_VNET_HDR`). The interface is created if it does not
//! exist and the process may create it; one this creates lives as long as
//! the descriptor, one made persistent beforehand (`ip tuntap add`) stays.
//!
//! It is written against libc by hand: a few calls, where the TUN/TAP
//! crates bring cross-platform layers, runtimes and address setting that
//! neither user needs (`netbridge/src/uplink.rs` weighs them).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name: IFNAMSIZ less the NUL.
pub const MAX_TAP_NAME: usize = libc::IFNAMSIZ - 1;

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A name the kernel would not take for an interface ([`valid_name`]).
    #[error(
        "invalid TAP name {0:?}: 1 to {max} printable ASCII characters, \
         no '/', ':' or '%', not '.' or '..'",
        max = MAX_TAP_NAME
    )]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("opening {TUN_PATH}: {0}{hint}", hint = open_hint(.0))]
    OpenTun(io::Error),
    /// `TUNSETIFF` refused the name.
    #[error("attaching TAP {name:?}: {err}{hint}", hint = attach_hint(.err))]
    Attach {
        /// The interface name.
        name: String,
        /// What the kernel said.
        err: io::Error,
    },
}

fn open_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => {
            " (no TUN/TAP support here: load the tun module, or create the node with \
             `mknod /dev/net/tun c 10 200`)"
        }
        io::ErrorKind::PermissionDenied => {
            " (read-write access to it is needed: run as root, or change the device's mode)"
        }
        _ => "",
    }
}

fn attach_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            " (creating a TAP, or attaching to one owned by another user, needs CAP_NET_ADMIN)"
        }
        Some(libc::EBUSY) => " (another process has it open)",
        Some(libc::EINVAL) => " (an interface of that name exists and is not a single-queue TAP)",
        _ => "",
    }
}

/// Whether `name` is an interface name the kernel takes as it is: what its
/// `dev_valid_name` asks (1 to [`MAX_TAP_NAME`] bytes, no `/`, `:` or
/// white space, not `.` or `..`), printable ASCII, and no `%` (the kernel
/// would take `tap%d` as a pattern and pick a name of its own).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'%'))
}

/// [`valid_name`] as a `Result`.
pub fn check_name(name: &str) -> Result<(), TapError> {
    match valid_name(name) {
        true => Ok(()),
        false => Err(TapError::Name(name.into())),
    }
}

/// Attaches to the TAP interface `name` (created if it does not exist),
/// without packet information; the descriptor is non-blocking and
/// close-on-exec. The name is checked before anything is opened.
pub fn open_tap(name: &str) -> Result<File, TapError> {
    check_name(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(TUN_PATH)
        .map_err(TapError::OpenTun)?;
    // SAFETY: an all-zero ifreq is a valid value (plain data and unions of
    // plain data).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // check_name kept the name within IFNAMSIZ - 1 bytes: the NUL stays.
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is and which
    // outlives the call; the descriptor is the clone device just opened.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    if r < 0 {
        return Err(TapError::Attach {
            name: name.into(),
            err: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let longest = "t".repeat(MAX_TAP_NAME);
        for good in ["up0", "a=b", "tap-1.x", &longest] {
            assert!(valid_name(good), "{good:?}");
        }
        let long = "t".repeat(MAX_TAP_NAME + 1);
        for bad in [
            "", &long, "a/b", "a:1", "sp ace", ".", "..", "é", "t%d", "a\0b",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        let e = check_name(&long).unwrap_err().to_string();
        assert!(e.contains("1 to 15 printable"), "{e}");
    }

    #[test]
    fn a_bad_name_is_refused_before_opening() {
        // Even without /dev/net/tun the error is the name's.
        assert!(matches!(open_tap("a/b"), Err(TapError::Name(_))));
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = TapError::OpenTun(io::Error::from(io::ErrorKind::NotFound)).to_string();
        assert!(
            e.starts_with("opening /dev/net/tun: ") && e.contains("tun module"),
            "{e}"
        );
        let e = TapError::Attach {
            name: "up0".into(),
            err: io::Error::from_raw_os_error(libc::EPERM),
        }
        .to_string();
        assert!(e.contains("\"up0\"") && e.contains("CAP_NET_ADMIN"), "{e}");
    }

    /// `lo` exists in every network namespace and is not a TAP: TUNSETIFF
    /// refuses it and changes nothing.
    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        match open_tap("lo") {
            Err(TapError::Attach { err, .. }) => {
                assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}")
            }
            // No TUN/TAP here, or no permission: a clear error all the same.
            Err(e @ TapError::OpenTun(_)) => eprintln!("{e}"),
            other => panic!("{other:?}"),
        }
    }
}
