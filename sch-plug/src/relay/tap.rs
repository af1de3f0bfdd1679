//! The relay's tap device: created in the domain's namespace, without packet information
//! (`IFF_NO_PI`) and with every offload cleared, so frames are exactly what QEMU's stream
//! netdev carries (a tap QEMU used before keeps its checksum offload flags otherwise, and
//! TCP then breaks: see `notes/e2e-failover.md`). `IFF_TUN_EXCL` refuses an existing tap:
//! the relay owns its device, and the device disappears when its fd is closed.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::netns::Netns;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_TUN_EXCL: i16 = -0x8000; // 0x8000 as a C short
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// Creates tap `name` in `netns`; returns its non-blocking fd.
pub fn create(name: &str, netns: &Netns) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ':', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "tap name {name:?} is not a valid interface name (1-15 bytes, no '/', ':', ' ')"
            ),
        ));
    }
    let name = name.to_string();
    netns.run(move || {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // struct ifreq: ifr_name[16], then the union, whose first member here is a short.
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on 64-bit Linux);
        // `ifr` is exactly that size, initialised, and outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int of flags); 0
        // clears every offload. No memory is passed.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from(file))
    })
}
