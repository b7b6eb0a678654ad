//! `-device virtio-balloon-pci|virtio-balloon-device[,deflate-on-oom=on]
//! [,free-page-reporting=on][,guest-stats-polling-interval=SECS]`: the
//! guest gives RAM back on QMP's `balloon`, and with free page reporting
//! of its own accord. QMP's `balloon` and `query-balloon` reach it through
//! its control face; the driver's progress becomes `BALLOON_CHANGE`.

use std::sync::{Arc, Mutex};

use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonEvents, BalloonHandle, PAGE_SHIFT};

use super::{Built, Bus, Device, Driver, HostSide, Kind, OpenContext, OpenError, RunContext};
use super::{Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::ctl::{Answer, Class, Command, CtlError, DeviceControl, Notice, Notices};

pub struct BalloonKind;
pub static KIND: BalloonKind = BalloonKind;

impl Kind for BalloonKind {
    fn name(&self) -> &'static str {
        devices::virtio::balloon::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "virtio-balloon-pci", bus: Bus::VirtioPci },
            Driver { name: "virtio-balloon-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device virtio-balloon-device|virtio-balloon-pci[,deflate-on-oom=on|off]
                      [,free-page-reporting=on|off]
                      [,guest-stats-polling-interval=SECS][,addr=..][,id=ID]
                         memory balloon: QMP balloon/query-balloon and
                         BALLOON_CHANGE; inflated and reported pages go
                         back to the host (not while vfio-pci pins RAM);
                         a guest reboot empties it
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { ram_discard: true, ..Sandbox::default() }
    }
    /// QEMU has one balloon handler per machine.
    fn max(&self) -> Option<usize> {
        Some(1)
    }
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let deflate_on_oom = opts.take_bool("deflate-on-oom")?.unwrap_or(false);
        let free_page_reporting = opts.take_bool("free-page-reporting")?.unwrap_or(false);
        let poll = opts.take_uint("guest-stats-polling-interval")?.unwrap_or(0);
        // QEMU's limit (balloon_stats_set_poll_interval).
        let poll_secs = u32::try_from(poll).map_err(|_| opts.error("timer value is too big"))?;
        if opts.take_bool("free-page-hint")?.unwrap_or(false) {
            return Err(opts.error(
                "free-page-hint=on is not supported (it serves migration, which skiff lacks)",
            ));
        }
        if opts.take_bool("page-poison")?.unwrap_or(false) {
            return Err(opts.error(
                "page-poison=on is not supported: a guest that poisons free pages does not report them",
            ));
        }
        Ok(Box::new(Balloons {
            config: BalloonConfig { deflate_on_oom, free_page_reporting },
            poll_secs,
        }))
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Balloons {
    pub config: BalloonConfig,
    pub poll_secs: u32,
}

impl Device for Balloons {
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let pinned = ctx.cfg.devices.iter().any(|d| d.device.facts().pins_guest_ram);
        if pinned {
            #[expect(clippy::disallowed_macros, reason = "startup: once per process")]
            {
                log::warn!(
                    "-device {}: guest RAM is pinned for vfio-pci, so the balloon's pages stay \
                     with the host process (as QEMU, which inhibits ballooning then)",
                    ctx.driver
                );
            }
        }
        Ok(Box::new(Opened {
            config: self.config,
            poll_secs: self.poll_secs,
            ram: ctx.cfg.mem_size,
            pinned,
        }))
    }
    fn sandbox(&self) -> Sandbox {
        KIND.sandbox()
    }
}

struct Opened {
    config: BalloonConfig,
    poll_secs: u32,
    /// The guest's RAM in bytes: what QMP's sizes are measured against.
    ram: u64,
    pinned: bool,
}

impl HostSide for Opened {
    /// A new balloon each run: a rebooted guest starts with all its RAM
    /// and no target.
    fn build(&self, run: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        let events = Arc::new(Changes { notices: run.notices.clone(), ram: self.ram });
        let handle = BalloonHandle::new(events, self.poll_secs);
        let discard = (!self.pinned).then(|| run.discard.clone());
        let device = Balloon::new(handle.clone(), self.config, discard);
        run.faces.offer(Arc::new(Face { handle, ram: self.ram }));
        Ok(Built::Virtio(Arc::new(Mutex::new(device))))
    }
}

/// RAM the guest keeps when its balloon holds `pages`.
fn kept(ram: u64, pages: u32) -> u64 {
    ram.saturating_sub(u64::from(pages) << PAGE_SHIFT)
}

/// The driver's progress, as `BALLOON_CHANGE`.
struct Changes {
    notices: Arc<Notices>,
    ram: u64,
}

impl BalloonEvents for Changes {
    fn actual_changed(&self, pages: u32) {
        self.notices.post(Notice::BalloonChange { actual: kept(self.ram, pages) });
    }
}

/// What QMP's `balloon` and `query-balloon` act on.
struct Face {
    handle: BalloonHandle,
    ram: u64,
}

impl DeviceControl for Face {
    fn classes(&self) -> &'static [Class] {
        &[Class::Balloon]
    }

    /// QEMU's `virtio_balloon_to_target` and `virtio_balloon_stat`.
    fn command(&self, cmd: &Command) -> Result<Answer, CtlError> {
        match *cmd {
            Command::BalloonTarget(bytes) => {
                let target = bytes.min(self.ram);
                let pages = (self.ram - target) >> PAGE_SHIFT;
                // RAM is at most 2^44 bytes here: 2^32 pages.
                self.handle.set_target(u32::try_from(pages).unwrap_or(u32::MAX));
                Ok(Answer::Done)
            }
            Command::QueryBalloon => {
                Ok(Answer::Balloon { actual: kept(self.ram, self.handle.actual()) })
            }
            _ => Err(CtlError::Failed("the balloon takes only balloon commands".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QMP sizes are the RAM the guest keeps: a target above the RAM
    /// means an empty balloon; `actual` counts back from the RAM.
    #[test]
    fn targets_and_answers_in_bytes_of_ram_kept() {
        let notices = Arc::new(Notices::new().unwrap());
        let ram = 512 << 20;
        let events = Arc::new(Changes { notices: notices.clone(), ram });
        let handle = BalloonHandle::new(events.clone(), 0);
        let face = Face { handle: handle.clone(), ram };
        face.command(&Command::BalloonTarget(256 << 20)).unwrap();
        assert_eq!(handle.target(), (256 << 20) >> 12);
        face.command(&Command::BalloonTarget(1 << 40)).unwrap();
        assert_eq!(handle.target(), 0);
        assert_eq!(
            face.command(&Command::QueryBalloon).unwrap(),
            Answer::Balloon { actual: 512 << 20 }
        );
        events.actual_changed(0x1000);
        assert_eq!(notices.take(), [Notice::BalloonChange { actual: (512 << 20) - (16 << 20) }]);
        // A driver that claims more than the RAM keeps nothing, not less.
        events.actual_changed(u32::MAX);
        assert_eq!(notices.take(), [Notice::BalloonChange { actual: 0 }]);
    }
}
