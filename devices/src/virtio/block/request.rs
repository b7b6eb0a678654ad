//! One virtio-blk request (virtio 1.2, 5.2.6): parsed from a chain read
//! once, checked, carried out on the disk, its status written back.
//!
//! The chain is a stream of device-readable bytes (the 16-byte header, then
//! data to write or discard segments) followed by device-writable bytes
//! (data read, or the ID) whose last byte is the status. Nothing a guest
//! puts there makes the device panic: a request that cannot be parsed or
//! served gets VIRTIO_BLK_S_IOERR or UNSUPP, or, with no status byte to
//! write, comes back empty.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use super::disk::Disk;
use super::SECTOR_SIZE;
use crate::virtio::chain::Chain;
use crate::virtio::GuestMemoryMmap;

/// Data moves between the disk and guest memory through this much host
/// memory at a time, whatever the request's size.
pub const CHUNK: usize = 1 << 20;

/// What the device does with the requests it understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `discard=unmap`: DISCARD and WRITE_ZEROES are offered and carried out.
    pub discard: bool,
    /// `detect-zeroes=on|unmap`: an all-zero write becomes a zero range
    /// (unmapped with `unmap` and `discard=unmap`).
    pub detect_zeroes: DetectZeroes,
    /// `serial=`: what GET_ID returns (up to 20 bytes).
    pub serial: Vec<u8>,
    /// No `format=`: the image was probed as raw. As QEMU's raw driver
    /// then does, a write must not make sector 0 look like another format
    /// (the next start would probe it as that, and show the guest's data as
    /// a container: a guest could read host files through a backing file).
    pub probed: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

/// The readable or writable half of a chain as one byte stream.
struct Stream<'a> {
    parts: Vec<&'a Descriptor>,
    len: u64,
}

impl<'a> Stream<'a> {
    fn new(parts: impl Iterator<Item = &'a Descriptor>) -> Self {
        let parts: Vec<_> = parts.filter(|d| d.len() > 0).collect();
        let len = parts.iter().map(|d| u64::from(d.len())).sum();
        Stream { parts, len }
    }

    /// Guest ranges covering `[offset, offset + len)` of the stream.
    fn ranges(&self, mut offset: u64, mut len: u64) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        for d in &self.parts {
            let dl = u64::from(d.len());
            if offset >= dl {
                offset -= dl;
                continue;
            }
            let n = (dl - offset).min(len);
            // Chain::read checked every buffer lies in guest memory.
            out.push((d.addr().unchecked_add(offset), n as usize));
            len -= n;
            offset = 0;
            if len == 0 {
                break;
            }
        }
        out
    }

    fn read(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> bool {
        let mut at = 0;
        for (addr, n) in self.ranges(offset, buf.len() as u64) {
            if mem.read_slice(&mut buf[at..at + n], addr).is_err() {
                return false;
            }
            at += n;
        }
        at == buf.len()
    }

    fn write(&self, mem: &GuestMemoryMmap, offset: u64, buf: &[u8]) -> bool {
        let mut at = 0;
        for (addr, n) in self.ranges(offset, buf.len() as u64) {
            if mem.write_slice(&buf[at..at + n], addr).is_err() {
                return false;
            }
            at += n;
        }
        at == buf.len()
    }
}

/// Why a request failed, with the status the guest gets.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    IoErr,
    Unsupp,
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Failure::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// The byte range of `sectors` sectors from `sector`, if it lies on the
/// disk (no overflow anywhere).
fn range(disk: &Disk, sector: u64, bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= disk.size() && bytes.is_multiple_of(SECTOR_SIZE)).then_some(offset)
}

/// A request an asynchronous engine can carry out itself: a plain read,
/// write or flush of guest buffers, each a (guest address, length) range.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Read { offset: u64, buffers: Vec<(GuestAddress, usize)> },
    Write { offset: u64, buffers: Vec<(GuestAddress, usize)> },
    Flush,
}

/// An asynchronous request's plan, with where its status goes and the
/// used length on success.
#[derive(Debug, PartialEq, Eq)]
pub struct Async {
    pub plan: Plan,
    pub status: GuestAddress,
    pub used: u32,
}

/// Sorts a request out: an IN, OUT or FLUSH that passes every check comes
/// back for an asynchronous engine; anything else (other types, errors,
/// detect-zeroes writes) is served here, synchronously, and its used
/// length comes back.
pub fn prepare(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    disk: &Disk,
    policy: &Policy,
) -> Result<Async, u32> {
    let readable = Stream::new(chain.descriptors.iter().filter(|d| !d.is_write_only()));
    let writable = Stream::new(chain.writable());
    let quick = || -> Option<Async> {
        if writable.len == 0 || readable.len < 16 {
            return None;
        }
        let mut header = [0u8; 16];
        if !readable.read(mem, 0, &mut header) {
            return None;
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().ok()?);
        let sector = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let data_in = writable.len - 1;
        let data_out = readable.len - 16;
        let status = writable.ranges(data_in, 1).first()?.0;
        let (plan, used) = match ty {
            VIRTIO_BLK_T_IN if data_in > 0 => {
                let offset = range(disk, sector, data_in)?;
                (Plan::Read { offset, buffers: writable.ranges(0, data_in) }, data_in + 1)
            }
            VIRTIO_BLK_T_OUT
                if data_out > 0
                    && !disk.read_only()
                    && policy.detect_zeroes == DetectZeroes::Off
                    // Sector 0 of a probed image is checked on a copy, here.
                    && !(policy.probed && sector == 0) =>
            {
                let offset = range(disk, sector, data_out)?;
                (Plan::Write { offset, buffers: readable.ranges(16, data_out) }, 1)
            }
            VIRTIO_BLK_T_FLUSH => (Plan::Flush, 1),
            _ => return None,
        };
        Some(Async { plan, status, used: u32::try_from(used).ok()? })
    };
    quick().ok_or_else(|| serve(mem, chain, disk, policy))
}

/// Writes an asynchronous request's outcome: its status byte; returns the
/// used length.
pub fn complete(mem: &GuestMemoryMmap, req: &Async, ok: bool) -> u32 {
    let status = if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR } as u8;
    if mem.write_obj(status, req.status).is_err() {
        return 0;
    }
    if ok {
        req.used
    } else {
        1
    }
}

/// Serves a request; returns the used length (bytes written to the
/// device-writable part, status included).
pub fn serve(mem: &GuestMemoryMmap, chain: &Chain, disk: &Disk, policy: &Policy) -> u32 {
    let readable = Stream::new(chain.descriptors.iter().filter(|d| !d.is_write_only()));
    let writable = Stream::new(chain.writable());
    if writable.len == 0 {
        log::debug!("virtio-blk: request {} has no status byte", chain.head);
        return 0;
    }
    let data_in = writable.len - 1;
    let (status, written) = match run(mem, &readable, &writable, data_in, disk, policy) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(f) => (f.status(), 0),
    };
    if !writable.write(mem, data_in, &[status]) {
        return 0;
    }
    // Used length: what was written before the status, and the status.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Carries the request out; returns the bytes of data it wrote to the
/// guest (before the status byte).
fn run(
    mem: &GuestMemoryMmap,
    readable: &Stream<'_>,
    writable: &Stream<'_>,
    data_in: u64,
    disk: &Disk,
    policy: &Policy,
) -> Result<u64, Failure> {
    let mut header = [0u8; 16];
    if readable.len < 16 || !readable.read(mem, 0, &mut header) {
        return Err(Failure::IoErr);
    }
    let ty = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let data_out = readable.len - 16;
    match ty {
        VIRTIO_BLK_T_IN => {
            let offset = range(disk, sector, data_in).ok_or(Failure::IoErr)?;
            let mut buf = vec![0u8; CHUNK.min(data_in as usize)];
            let mut done = 0u64;
            while done < data_in {
                let n = (data_in - done).min(CHUNK as u64) as usize;
                disk.read_at(&mut buf[..n], offset + done).map_err(|e| io_err("read", e))?;
                if !writable.write(mem, done, &buf[..n]) {
                    return Err(Failure::IoErr);
                }
                done += n as u64;
            }
            Ok(data_in)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() {
                return Err(Failure::IoErr);
            }
            let offset = range(disk, sector, data_out).ok_or(Failure::IoErr)?;
            let mut buf = vec![0u8; CHUNK.min(data_out as usize)];
            let mut done = 0u64;
            while done < data_out {
                let n = (data_out - done).min(CHUNK as u64) as usize;
                if !readable.read(mem, 16 + done, &mut buf[..n]) {
                    return Err(Failure::IoErr);
                }
                if policy.probed && offset + done == 0 {
                    if let Some(fmt) = super::disk::image_format(&buf[..n]) {
                        log::debug!("virtio-blk: a write would make the probed image {fmt}");
                        return Err(Failure::IoErr);
                    }
                }
                write_or_zero(disk, policy, &buf[..n], offset + done)?;
                done += n as u64;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.flush().map_err(|e| io_err("flush", e))?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            // 20 bytes, zero-padded; not NUL-terminated when all are used.
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = policy.serial.len().min(id.len());
            id[..n].copy_from_slice(&policy.serial[..n]);
            let n = (id.len() as u64).min(data_in) as usize;
            if !writable.write(mem, 0, &id[..n]) {
                return Err(Failure::IoErr);
            }
            Ok(n as u64)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if policy.discard => {
            if disk.read_only() {
                return Err(Failure::IoErr);
            }
            // One 16-byte segment, the most the config space allows.
            if data_out != 16 {
                return Err(Failure::Unsupp);
            }
            let mut seg = [0u8; 16];
            if !readable.read(mem, 16, &mut seg) {
                return Err(Failure::IoErr);
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            // Past what the config space advertises, QEMU answers IOERR: one
            // request must not hold the worker (and a stop waiting for it)
            // for terabytes of zeroing.
            if sectors > super::MAX_DISCARD_SECTORS {
                return Err(Failure::IoErr);
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let offset = range(disk, sector, bytes).ok_or(Failure::IoErr)?;
            let unmap =
                ty == VIRTIO_BLK_T_DISCARD || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            // Flags other than unmap are reserved (and unmap is only
            // meaningful for WRITE_ZEROES).
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (ty == VIRTIO_BLK_T_DISCARD && flags != 0)
            {
                return Err(Failure::Unsupp);
            }
            let r = if unmap {
                disk.punch_hole(offset, bytes)
            } else {
                disk.write_zeroes(offset, bytes)
            };
            r.map_err(|e| io_err("discard", e))?;
            Ok(0)
        }
        other => {
            log::debug!("virtio-blk: request type {other} not supported");
            Err(Failure::Unsupp)
        }
    }
}

/// A write, or with detect-zeroes an all-zero one as a zero range.
fn write_or_zero(disk: &Disk, policy: &Policy, buf: &[u8], offset: u64) -> Result<(), Failure> {
    let zeroes = policy.detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0);
    let r = if !zeroes {
        disk.write_at(buf, offset)
    } else if policy.detect_zeroes == DetectZeroes::Unmap && policy.discard {
        disk.punch_hole(offset, buf.len() as u64)
    } else {
        disk.write_zeroes(offset, buf.len() as u64)
    };
    r.map_err(|e| io_err("write", e))
}

/// A host I/O error goes back to the guest (werror/rerror=report); the
/// log says why at debug level, since the guest can cause it at will.
fn io_err(what: &str, e: std::io::Error) -> Failure {
    log::debug!("virtio-blk: {what} failed: {e}");
    Failure::IoErr
}
