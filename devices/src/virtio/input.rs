//! virtio-input (type 18) as QEMU's `virtio-keyboard`: a keyboard whose
//! key events come from the host (a monitor's `sendkey`, QMP's
//! `input-send-event`) through a [`KeyboardHandle`], each as the
//! `EV_KEY` event and an `EV_SYN` report, into the guest's event queue.
//! What the guest sends back on the status queue (LED state) is taken and
//! dropped. The config space answers the driver's questions as QEMU's
//! keyboard does (name, ids, the keys and LEDs it has, autorepeat).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::DescriptorChain;
use vmm_sys_util::eventfd::EventFd;

use super::chain::Chain;
use super::worker::{Budget, Handler, Outcome, Request, Ring, Worker};
use super::{
    read_config_from, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// The family its workers are known by.
pub const FAMILY: &str = "virtio-input";

const QUEUE_SIZES: &[u16] = &[64, 64];

// Config selectors (virtio 1.2, 5.8.4).
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_EV_BITS: u8 = 0x11;

// Linux input event types and codes.
const EV_SYN: u16 = 0x00;
const EV_KEY: u16 = 0x01;
const EV_LED: u16 = 0x11;
const EV_REP: u16 = 0x14;
const SYN_REPORT: u16 = 0;

/// QEMU's name and ids for its keyboard (BUS_VIRTUAL, QEMU's vendor).
const NAME: &[u8] = b"QEMU Virtio Keyboard";
const DEVIDS: [u16; 4] = [0x06, 0x0627, 0x0001, 0x0001];

/// Events waiting for the guest's buffers: a guest that takes none does not
/// make skiff hold more than this (the oldest go).
const MAX_PENDING: usize = 1024;

/// Key events from the host, on their way to the device's worker.
#[derive(Clone)]
pub struct KeyboardHandle(Arc<Shared>);

struct Shared {
    pending: Mutex<VecDeque<[u8; 8]>>,
    wake: EventFd,
    /// The driver has the device running (DRIVER_OK): QEMU's keyboard
    /// takes input only then, before the PS/2 one.
    active: AtomicBool,
}

impl KeyboardHandle {
    pub fn new() -> std::io::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(KeyboardHandle(Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            wake,
            active: AtomicBool::new(false),
        })))
    }

    /// Whether a driver runs the device now.
    pub fn active(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }

    /// Queues key `code` (a Linux `KEY_*`) going down or up, with the
    /// report that ends it.
    pub fn key(&self, code: u16, down: bool) {
        let mut q = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        for ev in [event(EV_KEY, code, u32::from(down)), event(EV_SYN, SYN_REPORT, 0)] {
            if q.len() == MAX_PENDING {
                q.pop_front();
            }
            q.push_back(ev);
        }
        drop(q);
        let _ = self.0.wake.write(1);
    }
}

fn event(ty: u16, code: u16, value: u32) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[0..2].copy_from_slice(&ty.to_le_bytes());
    e[2..4].copy_from_slice(&code.to_le_bytes());
    e[4..8].copy_from_slice(&value.to_le_bytes());
    e
}

pub struct Keyboard {
    handle: KeyboardHandle,
    /// The Linux key codes it has (EV_BITS for EV_KEY).
    keys: Vec<u16>,
    select: u8,
    subsel: u8,
    worker: Option<Worker<Queues>>,
}

impl Keyboard {
    /// A keyboard with the keys `keys` (Linux `KEY_*` codes).
    pub fn new(handle: KeyboardHandle, keys: Vec<u16>) -> Self {
        Keyboard { handle, keys, select: 0, subsel: 0, worker: None }
    }

    /// The union the driver selected (`select`, `subsel`), as bytes.
    fn selected(&self) -> Vec<u8> {
        match (self.select, self.subsel) {
            (CFG_ID_NAME, 0) => NAME.to_vec(),
            (CFG_ID_DEVIDS, 0) => DEVIDS.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (CFG_EV_BITS, s) if u16::from(s) == EV_KEY => bitmap(&self.keys),
            // NumLock, CapsLock, ScrollLock; and autorepeat.
            (CFG_EV_BITS, s) if u16::from(s) == EV_LED => bitmap(&[0, 1, 2]),
            (CFG_EV_BITS, s) if u16::from(s) == EV_REP => bitmap(&[0, 1]),
            _ => Vec::new(),
        }
    }

    fn config(&self) -> [u8; 136] {
        let mut c = [0u8; 136];
        let u = self.selected();
        let n = u.len().min(128);
        c[0] = self.select;
        c[1] = self.subsel;
        c[2] = n as u8;
        c[8..8 + n].copy_from_slice(&u[..n]);
        c
    }
}

/// A bitmap with `bits` set, as long as its highest byte.
fn bitmap(bits: &[u16]) -> Vec<u8> {
    let mut map = Vec::new();
    for &b in bits {
        let byte = usize::from(b / 8);
        if byte >= 128 {
            continue;
        }
        if map.len() <= byte {
            map.resize(byte + 1, 0);
        }
        map[byte] |= 1 << (b % 8);
    }
    map
}

/// The running queues, on the worker thread.
struct Queues {
    events: Ring,
    status: Ring,
    shared: Arc<Shared>,
}

const WAKE: u32 = 0;

impl MutEventSubscriber for Queues {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops, FAMILY);
        self.status.init(ops, FAMILY);
        if let Err(e) = ops.add(Events::with_data(&self.shared.wake, WAKE, EventSet::IN)) {
            crate::error_limited!("virtio-input: cannot watch for key events: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        if !self.events.take_event(&events) && !self.status.take_event(&events) {
            let _ = self.shared.wake.read();
        }
        let budget = Budget { requests: 64 };
        // The guest's LED and repeat settings: taken, not acted on.
        self.status.serve(budget, &mut Discard);
        let mut q = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !q.is_empty() {
            self.events.serve(budget, &mut Give(&mut q));
        }
    }
}

impl Handler for Queues {}

struct Discard;

impl Request for Discard {
    fn serve(&mut self, _: &GuestMemoryMmap, _: DescriptorChain<&GuestMemoryMmap>) -> Outcome {
        Outcome::Used(0)
    }
}

/// One event per buffer (Linux's driver gives 8-byte buffers).
struct Give<'a>(&'a mut VecDeque<[u8; 8]>);

impl Request for Give<'_> {
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let Some(ev) = self.0.front() else { return Outcome::HoldBack };
        let n = match Chain::read(mem, chain, usize::from(QUEUE_SIZES[0])) {
            Ok(c) => c.write_from(mem, ev),
            Err(e) => {
                log::debug!("virtio-input: event buffer: {e}");
                return Outcome::Used(0);
            }
        };
        if n == ev.len() {
            self.0.pop_front();
        }
        Outcome::Used(n as u32)
    }
}

impl VirtioDevice for Keyboard {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_INPUT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `select` and `subsel` are the driver's to write.
        for (i, &b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => self.select = b,
                1 => self.subsel = b,
                _ => {}
            }
        }
    }

    fn activate(&mut self, mut ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let events = ctx.take_queue(0)?;
        let status = ctx.take_queue(1)?;
        let ring = |q| Ring::new(ctx.mem.clone(), q, ctx.interrupt.clone());
        let queues = Queues {
            events: ring(events).map_err(ActivateError::EventFd)?,
            status: ring(status).map_err(ActivateError::EventFd)?,
            shared: self.handle.0.clone(),
        };
        self.worker = Some(Worker::spawn(FAMILY, FAMILY, queues).map_err(ActivateError::Worker)?);
        self.handle.0.active.store(true, Ordering::Release);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.handle.0.active.store(false, Ordering::Release);
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        // Keys meant for the last driver are not the next one's.
        self.handle.0.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.select = 0;
        self.subsel = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::ActiveQueue;

    fn cfg(k: &mut Keyboard, select: u8, subsel: u8) -> Vec<u8> {
        k.write_config(0, &[select, subsel]);
        let mut c = [0u8; 136];
        k.read_config(0, &mut c);
        c[8..8 + usize::from(c[2])].to_vec()
    }

    /// What Linux's virtio_input asks before it registers the device.
    #[test]
    fn config_answers_as_qemus_keyboard() {
        let mut k = Keyboard::new(KeyboardHandle::new().unwrap(), vec![1, 28, 29, 111]);
        assert_eq!(cfg(&mut k, CFG_ID_NAME, 0), b"QEMU Virtio Keyboard");
        assert_eq!(cfg(&mut k, CFG_ID_DEVIDS, 0), [6, 0, 0x27, 6, 1, 0, 1, 0]);
        let keys = cfg(&mut k, CFG_EV_BITS, 1);
        assert_eq!(keys.len(), 14, "up to KEY_DELETE (111)");
        assert_eq!(keys[0], 0b10, "KEY_ESC");
        assert_eq!(keys[3], 0b0011_0000, "KEY_ENTER, KEY_LEFTCTRL");
        assert_eq!(keys[13], 0x80, "KEY_DELETE");
        assert_eq!(cfg(&mut k, CFG_EV_BITS, 0x11), [0b111]);
        assert!(cfg(&mut k, CFG_EV_BITS, 2).is_empty(), "no relative axes");
        assert!(cfg(&mut k, 0x7f, 0).is_empty());
    }

    /// A key reaches the guest as EV_KEY then SYN_REPORT, one per buffer;
    /// events wait for buffers.
    #[test]
    fn keys_reach_the_event_queue() {
        let mem = guest_mem(0x40_0000);
        let mut eq = TestQueue::new_at(&mem, 16, 0);
        let sq = TestQueue::new_at(&mem, 16, 0x4000);
        let handle = KeyboardHandle::new().unwrap();
        let mut k = Keyboard::new(handle.clone(), vec![29]);
        let irq = Arc::new(RecordingInterrupt::default());
        let q = |i: usize, tq: &TestQueue| ActiveQueue {
            index: i,
            queue: tq.queue(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let queues = vec![q(0, &eq), q(1, &sq)];
        assert!(!handle.active());
        k.activate(ActivationContext { mem: mem.clone(), queues, interrupt: irq }).unwrap();
        assert!(handle.active());
        handle.key(29, true);
        for i in 0..2 {
            eq.add_chain(&[(DATA + i * 8, 8, WRITE)]);
        }
        // The kick is not needed: the key's own wakeup finds the buffers,
        // or the buffers' re-arm finds the key.
        handle.key(29, false);
        wait_until(10, || eq.used().len() == 2);
        assert_eq!(eq.used(), [(0, 8), (1, 8)]);
        assert_eq!(read(&mem, DATA, 8), event(EV_KEY, 29, 1));
        assert_eq!(read(&mem, DATA + 8, 8), event(EV_SYN, 0, 0));
        assert!(k.reset());
        assert!(!handle.active());
    }
}
