//! virtio-blk requests (virtio 1.x, 5.2.6): reading a descriptor chain of
//! any layout, checking it, and carrying it out on a [`SpecDisk`].
//!
//! A chain is device-readable descriptors (the 16-byte header `type`,
//! `reserved`, `sector`, then the data of OUT and DISCARD) followed by
//! device-writable ones (the data of IN and GET_ID, then the status byte,
//! the chain's last byte). Descriptors may split these anywhere.
//!
//! When the chain's last descriptor is device-writable and in guest memory
//! the request is answered: OK, or IOERR / UNSUPP for anything wrong with
//! it (a short header, a readable descriptor after a writable one, a buffer
//! outside guest memory, a length that is not whole sectors, a range past
//! the disk's end or whose byte offset overflows, a write to a read-only
//! disk, more than [`MAX_REQUEST_BYTES`], the disk failing). Otherwise
//! there is nowhere to put a status: the chain goes back to the used ring
//! with length 0 and the request is dropped ([`ChainError`]).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::overlay::{BaseIo, OverlayError, SpecDisk, SECTOR_SIZE};
use crate::vstate::memory::GuestMemoryMmap;

/// The longest chain read (it bounds the work on chains that loop through
/// an indirect table; direct chains stop at the queue size).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;
/// The most data one request may carry: far above what Linux sends
/// (1.25 MiB by default), low enough to bound one request's work.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Data moves between guest memory and the disk in pieces of this size.
const CHUNK: usize = 256 << 10;
/// Length of the request header.
pub const HEADER_LEN: u64 = 16;
/// Length of one discard segment: sector (u64), num_sectors, flags (u32).
pub const DISCARD_SEG_LEN: u64 = 16;
/// Sectors one discard segment may cover (16 MiB).
pub const MAX_DISCARD_SECTORS: u32 = 32 << 10;
/// Segments one discard request may carry.
pub const MAX_DISCARD_SEG: u32 = 16;

/// Status: success.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Status: the request failed.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status: the request type or a flag is not supported.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a chain could not be answered with a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors (a loop).
    #[error("chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// The last descriptor is missing, empty or device-readable.
    #[error("the chain does not end with a device-writable status byte")]
    NoStatus,
    /// The status byte is outside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusMemory(u64),
}

/// A run of guest memory.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// A chain split into its readable and writable parts.
#[derive(Debug, Default)]
pub struct Chain {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    /// A readable descriptor came after a writable one.
    misordered: bool,
    /// Bytes in each part.
    readable_len: u64,
    writable_len: u64,
}

/// What a request came to: its status and the bytes written into the
/// chain's writable part (the used length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status byte.
    pub status: u8,
    /// The used length, status byte included.
    pub used_len: u32,
}

/// What a request may do, besides the disk.
pub struct Env<'a> {
    /// The serial number GET_ID returns.
    pub id: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Whether the driver accepted VIRTIO_BLK_F_DISCARD.
    pub discard: bool,
}

impl Chain {
    /// Reads the descriptors of `chain` (without touching their buffers)
    /// and finds the status byte.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<(Self, GuestAddress), ChainError> {
        let mut c = Chain::default();
        let mut last = None;
        for (n, d) in chain.enumerate() {
            if n >= MAX_CHAIN_DESCRIPTORS {
                return Err(ChainError::TooManyDescriptors);
            }
            let seg = Seg {
                addr: d.addr(),
                len: d.len().into(),
            };
            if d.is_write_only() {
                c.writable_len += seg.len;
                c.writable.push(seg);
            } else {
                c.misordered |= !c.writable.is_empty();
                c.readable_len += seg.len;
                c.readable.push(seg);
            }
            last = Some((seg, d.is_write_only()));
        }
        let Some((seg, true)) = last.filter(|(s, _)| s.len > 0) else {
            return Err(ChainError::NoStatus);
        };
        let status = seg
            .addr
            .checked_add(seg.len - 1)
            .filter(|&a| mem.check_range(a, 1))
            .ok_or(ChainError::StatusMemory(
                seg.addr.0.wrapping_add(seg.len - 1),
            ))?;
        Ok((c, status))
    }

    /// Carries the request out on `disk`.
    pub fn execute<B: BaseIo>(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut SpecDisk<B>,
        env: &Env<'_>,
    ) -> Outcome {
        let fail = |status| Outcome {
            status,
            used_len: 1,
        };
        if self.misordered || self.readable_len < HEADER_LEN {
            return fail(S_IOERR);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        if read_segs(mem, &self.readable, 0, &mut hdr).is_err() {
            return fail(S_IOERR);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..]);
        let sector = u64::from_le_bytes(sector);
        let r = match kind {
            VIRTIO_BLK_T_IN => self.read(mem, disk, sector),
            VIRTIO_BLK_T_OUT => self.write(mem, disk, sector),
            VIRTIO_BLK_T_FLUSH => disk.flush().map(|()| 1).map_err(log_io),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, env.id),
            VIRTIO_BLK_T_DISCARD if env.discard => self.discard(mem, disk),
            _ => Err(S_UNSUPP),
        };
        match r {
            Ok(used_len) => Outcome {
                status: S_OK,
                used_len,
            },
            Err(status) => fail(status),
        }
    }

    /// The byte offset of a transfer of `len` bytes at `sector` on a disk
    /// of `size` bytes, checked before any byte moves.
    fn data_range(sector: u64, len: u64, size: u64) -> Result<u64, u8> {
        if !len.is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST_BYTES {
            return Err(S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset),
            _ => Err(S_IOERR),
        }
    }

    fn read<B: BaseIo>(
        &self,
        mem: &GuestMemoryMmap,
        disk: &SpecDisk<B>,
        sector: u64,
    ) -> Result<u32, u8> {
        let len = self.writable_len - 1;
        let offset = Self::data_range(sector, len, disk.size())?;
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            disk.read(offset + done, &mut buf[..n]).map_err(log_io)?;
            write_segs(mem, &self.writable, done, &buf[..n]).map_err(|()| S_IOERR)?;
            done += n as u64;
        }
        // At most MAX_REQUEST_BYTES + 1.
        Ok(len as u32 + 1)
    }

    fn write<B: BaseIo>(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut SpecDisk<B>,
        sector: u64,
    ) -> Result<u32, u8> {
        if disk.read_only() {
            return Err(S_IOERR);
        }
        let len = self.readable_len - HEADER_LEN;
        let offset = Self::data_range(sector, len, disk.size())?;
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            read_segs(mem, &self.readable, HEADER_LEN + done, &mut buf[..n])
                .map_err(|()| S_IOERR)?;
            disk.write(offset + done, &buf[..n]).map_err(log_io)?;
            done += n as u64;
        }
        Ok(1)
    }

    fn get_id(&self, mem: &GuestMemoryMmap, id: &[u8]) -> Result<u32, u8> {
        if self.writable_len - 1 < id.len() as u64 {
            return Err(S_IOERR);
        }
        write_segs(mem, &self.writable, 0, id).map_err(|()| S_IOERR)?;
        Ok(id.len() as u32 + 1)
    }

    /// Checks every segment, then discards them all.
    fn discard<B: BaseIo>(&self, mem: &GuestMemoryMmap, disk: &mut SpecDisk<B>) -> Result<u32, u8> {
        if disk.read_only() {
            return Err(S_IOERR);
        }
        let len = self.readable_len - HEADER_LEN;
        let count = len / DISCARD_SEG_LEN;
        if !len.is_multiple_of(DISCARD_SEG_LEN) || count == 0 || count > MAX_DISCARD_SEG.into() {
            return Err(S_IOERR);
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut seg = [0u8; DISCARD_SEG_LEN as usize];
            read_segs(
                mem,
                &self.readable,
                HEADER_LEN + i * DISCARD_SEG_LEN,
                &mut seg,
            )
            .map_err(|()| S_IOERR)?;
            let le32 = |o: usize| u32::from_le_bytes([seg[o], seg[o + 1], seg[o + 2], seg[o + 3]]);
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[..8]);
            let (sector, num, flags) = (u64::from_le_bytes(s), le32(8), le32(12));
            if flags != 0 {
                // Unknown flags, or "unmap" (bit 0), which only
                // WRITE_ZEROES takes (5.2.6.2).
                return Err(S_UNSUPP);
            }
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
            let bytes = u64::from(num) * SECTOR_SIZE;
            if num > MAX_DISCARD_SECTORS
                || offset.checked_add(bytes).is_none_or(|e| e > disk.size())
            {
                return Err(S_IOERR);
            }
            ranges.push((offset, bytes));
        }
        for (offset, bytes) in ranges {
            disk.discard(offset, bytes).map_err(log_io)?;
        }
        Ok(1)
    }
}

/// Logs a disk failure (at debug level: a guest can cause many) and turns
/// it into a status.
fn log_io(e: OverlayError) -> u8 {
    tracing::debug!("virtio-blk: request failed: {e}");
    S_IOERR
}

/// Calls `f(segment, offset in it, offset in the data, length)` for the
/// pieces of `segs` that hold bytes `[skip, skip + len)` of their
/// concatenation. Fails if they hold fewer bytes.
fn for_pieces(
    segs: &[Seg],
    skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut pos = 0u64;
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let end = pos + s.len;
        let from = skip + done as u64;
        if from < end {
            let in_seg = from - pos;
            let n = ((s.len - in_seg) as usize).min(len - done);
            let addr = s.addr.checked_add(in_seg).ok_or(())?;
            f(addr, done, n)?;
            done += n;
        }
        pos = end;
    }
    if done == len {
        Ok(())
    } else {
        Err(())
    }
}

/// Reads bytes `[skip, skip + buf.len())` of the segments into `buf`.
fn read_segs(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, buf: &mut [u8]) -> Result<(), ()> {
    for_pieces(segs, skip, buf.len(), |addr, at, n| {
        mem.read_slice(&mut buf[at..at + n], addr).map_err(|_| ())
    })
}

/// Writes `data` at byte `skip` of the segments.
fn write_segs(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, data: &[u8]) -> Result<(), ()> {
    for_pieces(segs, skip, data.len(), |addr, at, n| {
        mem.write_slice(&data[at..at + n], addr).map_err(|_| ())
    })
}
