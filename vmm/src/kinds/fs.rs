//! `-device vhost-user-fs-pci|vhost-user-fs-device,chardev=ID,tag=TAG`: a
//! virtiofs share served by virtiofsd on a `-chardev socket`. Skiff hands
//! virtiofsd the memory table, kick and call eventfds; virtiofsd serves
//! the queues from guest RAM itself.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::vhost_user::fs::{FsParams, VhostUserFs, TAG_LEN};
use devices::vhost_user::Connection;

use super::{Built, Bus, Device, Driver, Facts, HostSide, Kind, OpenContext, OpenError, Refs};
use super::{RunContext, Sandbox, Unresolved};
use crate::cli::{CliError, QemuOpts};
use crate::config::{ChardevBackend, ChardevConfig};

pub struct FsKind;
pub static KIND: FsKind = FsKind;

impl Kind for FsKind {
    fn name(&self) -> &'static str {
        // Its workers announce themselves by it (the sandbox's key).
        devices::vhost_user::fs::FAMILY
    }
    fn drivers(&self) -> &'static [Driver] {
        &[
            Driver { name: "vhost-user-fs-pci", bus: Bus::VirtioPci },
            Driver { name: "vhost-user-fs-device", bus: Bus::VirtioMmio },
        ]
    }
    fn help(&self) -> &'static str {
        "\
-device vhost-user-fs-device|vhost-user-fs-pci,chardev=ID,tag=TAG
        [,queue-size=N][,num-request-queues=N][,addr=..][,bus=ID][,id=ID]
                         a virtiofs share served by virtiofsd on -chardev
                         socket ID; guest RAM is shared with it (without
                         -object memory-backend-memfd,share=on, skiff makes
                         RAM a shared memfd); if virtiofsd dies, the share
                         fails with ENOTCONN and the VM goes on
"
    }
    fn sandbox(&self) -> Sandbox {
        Sandbox { backend_socket: true, ..Sandbox::default() }
    }
    /// QEMU's defaults and limits (hw/virtio/vhost-user-fs.c).
    fn parse(&self, opts: &mut QemuOpts, _: Bus) -> Result<Box<dyn Unresolved>, CliError> {
        let chardev = opts.take("chardev").ok_or_else(|| opts.missing("chardev"))?;
        let tag = opts.take("tag").ok_or_else(|| opts.missing("tag"))?;
        if tag.is_empty() {
            return Err(opts.error("tag property must not be empty"));
        }
        if tag.len() > TAG_LEN {
            return Err(opts.error(format!(
                "tag property must be {TAG_LEN} bytes or less (is {})",
                tag.len()
            )));
        }
        let num_request_queues = match opts.take_uint("num-request-queues")?.unwrap_or(1) {
            n @ 1..=1022 => n as u16,
            0 => return Err(opts.error("num-request-queues property must be larger than 0")),
            n => return Err(opts.error(format!("num-request-queues={n}: at most 1022"))),
        };
        let queue_size = opts.take_uint("queue-size")?.unwrap_or(128);
        if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
            return Err(
                opts.error(format!("queue-size={queue_size}: must be a power of 2 from 2 to 1024"))
            );
        }
        let queue_size = queue_size as u16;
        Ok(Box::new(Pending { chardev, share: Share { tag, queue_size, num_request_queues } }))
    }
}

/// The share as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub queue_size: u16,
    pub num_request_queues: u16,
}

#[derive(Debug)]
struct Pending {
    chardev: String,
    share: Share,
}

impl Unresolved for Pending {
    fn resolve(
        self: Box<Self>,
        option: &str,
        refs: &mut Refs,
    ) -> Result<Box<dyn Device>, CliError> {
        let chardev: Arc<ChardevConfig> = refs.take(option, &self.chardev)?;
        let ChardevBackend::Socket { path, server: false, reconnect_ms, .. } = &chardev.backend
        else {
            let id = &self.chardev;
            return Err(CliError::Invalid {
                option: option.to_owned(),
                reason: format!(
                    "chardev '{id}' must be a client socket to the backend \
                     (-chardev socket,id={id},path=PATH)"
                ),
            });
        };
        Ok(Box::new(VirtioFs {
            chardev: chardev.id.clone(),
            socket: path.clone(),
            reconnect_ms: *reconnect_ms,
            share: self.share,
        }))
    }
}

/// A virtiofs share on virtiofsd's socket.
#[derive(Debug, PartialEq, Eq)]
pub struct VirtioFs {
    pub chardev: String,
    pub socket: PathBuf,
    /// `reconnect=`: how often to try a new virtiofsd after losing one.
    pub reconnect_ms: Option<u64>,
    pub share: Share,
}

impl Device for VirtioFs {
    /// The connection is made here once: virtiofsd serves one client and
    /// exits when it goes, so the connection must outlive guest reboots.
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Box<dyn HostSide>, OpenError> {
        let queues = 1 + usize::from(self.share.num_request_queues);
        let mut connection = Connection::connect(&self.socket, queues).map_err(|e| {
            OpenError::new(format!("-device {},chardev={}", ctx.driver, self.chardev), e)
        })?;
        connection.set_reconnect(self.reconnect_ms.map(Duration::from_millis));
        let params = FsParams {
            tag: self.share.tag.clone(),
            num_request_queues: self.share.num_request_queues,
            queue_size: self.share.queue_size,
        };
        Ok(Box::new(Opened { connection: Arc::new(Mutex::new(connection)), params }))
    }
    fn sandbox(&self) -> Sandbox {
        KIND.sandbox()
    }
    fn facts(&self) -> Facts {
        Facts { maps_guest_ram: true, ..Facts::default() }
    }
}

struct Opened {
    connection: Arc<Mutex<Connection>>,
    params: FsParams,
}

impl HostSide for Opened {
    fn build(&self, _: &mut RunContext<'_>) -> crate::vm::Result<Built> {
        let fs = VhostUserFs::new(self.connection.clone(), &self.params);
        Ok(Built::Virtio(Arc::new(Mutex::new(fs))))
    }
}
