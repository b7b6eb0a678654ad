//! `-device virtio-blk-pci|virtio-blk-device,drive=ID,...`: a disk on a
//! `-drive` image, opened and locked once for the process.

use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockParams, Disk, DiskOptions, Policy};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, Refs, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::config::DriveConfig;

pub struct BlockKind;
pub static KIND: BlockKind = BlockKind;

impl Kind for BlockKind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::virtio::block::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-blk-pci", bus: Bus::VirtioPci },
            Driver { name: "virtio-blk-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-blk-device|virtio-blk-pci,drive=ID[,serial=S][,num-queues=N]
        [,queue-size=N][,logical_block_size=N][,physical_block_size=N]
        [,bootindex=N][,addr=..][,bus=ID][,disable-legacy=on][,id=ID]
                         a disk on -drive ID (virtio-mmio or PCIe); num-queues
                         defaults to one per vCPU on PCIe; bootindex has no
                         effect (skiff has no firmware to boot a disk)
-drive id=ID,file=PATH[,if=none][,format=raw|qcow2][,read-only=on|off]
       [,cache=none|writeback|writethrough|directsync|unsafe][,cache.direct=on|off]
       [,discard=unmap|ignore][,detect-zeroes=off|on|unmap][,aio=io_uring|threads|native]
       [,werror=report][,rerror=report][,file.locking=on|off][,index=N]
                         a raw or qcow2 image (no format=: probed as QEMU
                         probes: qcow2 by its magic, another format refused,
                         raw with QEMU's warning and writes that would make
                         block 0 another format failing); qcow2 through imago,
                         its backing file (next to it) read-only, not with
                         cache=none, not encrypted, served by the thread pool
                         (aio=io_uring too); locked as QEMU locks it; cache=none on a
                         filesystem without O_DIRECT (tmpfs) falls back to the
                         page cache with a warning; each queue runs on a worker
                         thread of its own, many requests at once: through a
                         thread pool (aio=threads, the default) or an io_uring
                         (aio=io_uring or native; a pool where the host has
                         no io_uring); aio=native needs cache=none, as in QEMU.
                         An I/O error is reported to the guest (werror and
                         rerror are always report: QEMU's default werror=enospc
                         pauses the VM on a full disk, and skiff cannot pause)
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { disk: true, uring: true, ..Sandbox::default() }
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let drive = opts.take("drive").ok_or_else(|| opts.missing("drive"))?;
        let serial = opts.take("serial");
        let num_queues = match opts.take_uint("num-queues")? {
            None => None,
            Some(n @ 1..=256) => Some(n as u16),
            Some(n) => return Err(opts.error(format!("num-queues={n}: must be 1 to 256"))),
        };
        let queue_size = opts.take_uint("queue-size")?.unwrap_or(256);
        if !queue_size.is_power_of_two() || !(4..=1024).contains(&queue_size) {
            // QEMU: "queue-size property must be > 2 and <= 1024, and a power of 2".
            return Err(
                opts.error(format!("queue-size={queue_size}: must be a power of 2 from 4 to 1024"))
            );
        }
        let logical = opts.take_size("logical_block_size")?.unwrap_or(512);
        let physical = opts.take_size("physical_block_size")?.unwrap_or(logical);
        for (key, v) in [("logical_block_size", logical), ("physical_block_size", physical)] {
            if !v.is_power_of_two() || !(512..=32768).contains(&v) {
                return Err(
                    opts.error(format!("{key}={v}: must be a power of 2 from 512 to 32768"))
                );
            }
        }
        if physical < logical {
            return Err(opts.error("physical_block_size must be at least logical_block_size"));
        }
        // There is no firmware to boot from a disk: accepted, no effect.
        opts.take_uint("bootindex")?;
        let shape = Shape {
            serial,
            num_queues,
            queue_size: queue_size as u16,
            logical_block_size: logical as u32,
            physical_block_size: physical as u32,
        };
        Ok(Box::new(Pending { drive, shape }))
    }
}

/// The device's own properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub serial: Option<String>,
    /// None: QEMU's default, one queue per vCPU on PCI, one on MMIO.
    pub num_queues: Option<u16>,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
}

#[derive(Debug)]
struct Pending {
    drive: String,
    shape: Shape,
}

impl Unresolved for Pending {
    fn resolve(
        self: Box<Self>,
        option: &str,
        refs: &mut Refs,
    ) -> Result<Box<dyn Device>, CliError> {
        let drive = refs.take(option, &self.drive)?;
        Ok(Box::new(Blk { drive, shape: self.shape }))
    }
}

/// A virtio-blk on its `-drive`.
#[derive(Debug, PartialEq, Eq)]
pub struct Blk {
    pub drive: Arc<DriveConfig>,
    pub shape: Shape,
}

impl Device for Blk {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let drive = &self.drive;
        let opts = DiskOptions {
            path: drive.file.clone(),
            read_only: drive.read_only,
            direct: drive.direct,
            dsync: drive.dsync,
            ignore_flush: drive.ignore_flush,
            locking: drive.locking,
        };
        let what = || format!("-drive id={}", drive.id);
        let mut disk = Disk::open(&opts).map_err(|e| OpenError::new(what(), e))?;
        // No format= : probed as QEMU probes (qcow2 by its magic). An image
        // of another format would show the guest its container (and take
        // its writes).
        let mut probed_raw = false;
        let qcow2 = if drive.format_given {
            drive.qcow2
        } else {
            match disk.probe_format().map_err(|e| OpenError::new(what(), e))? {
                Some("qcow2") => true,
                Some(fmt) => {
                    let e = std::io::Error::other(format!(
                        "'{}' is a {fmt} image; skiff reads raw and qcow2 images only \
                         (format=raw would show the guest the {fmt} file's own bytes)",
                        drive.file.display()
                    ));
                    return Err(OpenError::new(what(), e));
                }
                None => {
                    probed_raw = true;
                    false
                }
            }
        };
        if qcow2 {
            disk.open_qcow2().map_err(|e| OpenError::new(what(), e))?;
        }
        if probed_raw {
            #[expect(clippy::disallowed_macros, reason = "startup: once per -drive")]
            {
                log::warn!(
                    "Image format was not specified for '{}' and probing guessed raw. \
                     Automatically detecting the format is dangerous for raw images, write \
                     operations on block 0 will be restricted. Specify the 'raw' format \
                     explicitly to remove the restrictions.",
                    drive.file.display()
                );
            }
        }
        // QEMU's default: a queue per vCPU on PCI (at most 256), one on MMIO.
        let pci = ctx.bus == Bus::VirtioPci;
        let cpus = ctx.cfg.smp.cpus.clamp(1, 256) as u16;
        let s = &self.shape;
        let params = BlockParams {
            num_queues: s.num_queues.unwrap_or(if pci { cpus } else { 1 }),
            queue_size: s.queue_size,
            logical_block_size: s.logical_block_size,
            physical_block_size: s.physical_block_size,
            policy: Policy {
                discard: drive.discard,
                detect_zeroes: drive.detect_zeroes,
                serial: s.serial.clone().unwrap_or_default().into_bytes(),
                probed: probed_raw,
            },
            aio: drive.aio,
        };
        Ok(Box::new(Opened { disk: Arc::new(disk), params }))
    }
    fn sandbox(&self) -> Sandbox {
        // A ring only where the drive asks for one.
        let uring = self.drive.aio != devices::virtio::block::Aio::Threads;
        Sandbox { uring, ..KIND.sandbox() }
    }
}

struct Opened {
    disk: Arc<Disk>,
    params: BlockParams,
}

impl HostSide for Opened {
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        Ok(Built::Virtio(Arc::new(Mutex::new(Block::new(self.disk.clone(), self.params.clone())))))
    }
}
