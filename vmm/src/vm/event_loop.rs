//! The VMM thread's event loop for one run: QMP, termination signals and
//! the board's host-side work, until a device, a vCPU, QMP or a signal
//! decides the run is over.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::board::Board;
use super::control::{Control, Outcome};
use super::{io_err, Error, Monitors, Result, RunEnd};
use crate::ctl::Controls;

/// Wakes the loop when the machine must stop: a device/vCPU outcome or a
/// termination signal. It only drains the eventfds; the loop reads why.
struct StopWatcher {
    control: EventFd,
    signal: EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.control, &self.signal] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                devices::error_limited!("event loop: cannot watch a stop eventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Leave the counters set: `event_loop` checks the outcome itself,
        // and a level-triggered fd that stays readable costs nothing here
        // because the loop ends on the same wakeup.
        let _ = events;
    }
}

/// Runs the loop until the machine must stop. It serves QMP, signals and
/// the board's subscribers (serial input, the RTC's timer, call relays,
/// INTx resamplers); no device's data plane runs here.
pub(super) fn run(
    control: &Arc<Control>,
    signal_evt: &EventFd,
    board: Board,
    monitors: &Monitors<'_>,
) -> Result<RunEnd> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(Error::EventManager)?;
    let watcher = StopWatcher {
        control: control.eventfd().try_clone().map_err(io_err("eventfd"))?,
        signal: signal_evt.try_clone().map_err(io_err("eventfd"))?,
    };
    em.add_subscriber(Arc::new(Mutex::new(watcher)));
    let controls = Controls {
        machine: control.clone(),
        faces: board.faces,
        device_ids: board.device_ids.into(),
    };
    for monitor in monitors(&controls) {
        em.add_subscriber(monitor);
    }
    for sub in board.subscribers {
        em.add_subscriber(sub);
    }
    loop {
        if let Some(sig) = crate::host::signals::last_signal() {
            return Ok(RunEnd::Signal(sig));
        }
        match control.outcome() {
            Some(Outcome::Guest(ev)) => return Ok(RunEnd::Guest(ev)),
            Some(Outcome::Fatal(msg)) => return Ok(RunEnd::Fatal(msg)),
            Some(Outcome::Quit) => return Ok(RunEnd::Quit),
            Some(Outcome::HostReset) => return Ok(RunEnd::HostReset),
            None => {}
        }
        em.run().map_err(Error::EventManager)?;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use devices::virtio::{
        ActivationContext, ActiveQueue, RngBackend, VirtioDevice, VirtioInterrupt,
        VirtioInterruptType,
    };
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT as INDIRECT, VRING_DESC_F_NEXT as NEXT, VRING_DESC_F_WRITE as WRITE,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueState};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::qmp::{QmpHandler, QmpServer};

    /// The run's monitors: QMP on `server`.
    fn monitor(
        server: &Arc<Mutex<QmpServer>>,
    ) -> impl Fn(&Controls) -> Vec<crate::vm::Subscriber> + '_ {
        move |c| vec![Arc::new(Mutex::new(QmpHandler::new(server.clone(), c.clone())))]
    }
    use crate::config::{QmpAddress, QmpConfig};

    type Mem = vm_memory::GuestMemoryMmap<()>;

    struct NoInterrupt;

    impl VirtioInterrupt for NoInterrupt {
        fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
            Ok(())
        }
        fn needs_reset(&self) {
            panic!("the flood is a valid ring");
        }
    }

    const QUEUE: u16 = 256;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    /// 65,535 descriptors of one indirect table, shared by every request.
    const TABLE: u64 = 0x10_0000;
    const ENTRIES: u16 = u16::MAX;

    /// A full-size split queue whose every descriptor points at the huge
    /// indirect table.
    fn flooded_queue(mem: &Mem) -> Queue {
        for i in 0..ENTRIES {
            let flags = WRITE | if i + 1 < ENTRIES { NEXT } else { 0 };
            let d = Descriptor::new(0x20_0000, 16, flags as u16, i + 1);
            mem.write_obj(d, GuestAddress(TABLE + u64::from(i) * 16)).unwrap();
        }
        for head in 0..QUEUE {
            let d = Descriptor::new(TABLE, u32::from(ENTRIES) * 16, INDIRECT as u16, 0);
            mem.write_obj(d, GuestAddress(DESC + u64::from(head) * 16)).unwrap();
        }
        let state = QueueState {
            max_size: QUEUE,
            size: QUEUE,
            ready: true,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            ..Default::default()
        };
        Queue::try_from(state).unwrap()
    }

    /// The driver's side: puts `n` more heads on the available ring.
    fn post(mem: &Mem, next: &mut u16, n: u16) {
        for _ in 0..n {
            let slot = AVAIL + 4 + 2 * u64::from(*next % QUEUE);
            mem.write_obj(*next % QUEUE, GuestAddress(slot)).unwrap();
            *next = next.wrapping_add(1);
        }
        mem.write_obj(*next, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Waits up to 30 s for `cond`.
    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A guest floods its virtio-rng with requests of 65,535 indirect
    /// descriptors each and keeps the ring full; a QMP client's command
    /// sent meanwhile is answered by the event loop, and the device keeps
    /// serving the flood (on its worker, `REQUESTS_PER_WAKEUP` at a time).
    #[test]
    fn qmp_is_answered_while_a_guest_floods_its_rng() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queue = ActiveQueue {
            index: 0,
            queue: flooded_queue(&mem),
            kick: kick.try_clone().unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let mut rng = devices::virtio::Rng::new(Arc::new(RngBackend::new(None).unwrap()));
        let ctx = ActivationContext {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt: Arc::new(NoInterrupt),
        };

        let dir = std::env::temp_dir().join(format!("skiff-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let cfg = QmpConfig { address: QmpAddress::Unix(sock.clone()), wait: false };
        let server = Arc::new(Mutex::new(QmpServer::bind(&cfg).unwrap()));
        let control = Arc::new(Control::new().unwrap());
        let signal = EventFd::new(libc::EFD_NONBLOCK).unwrap();

        let stop = AtomicBool::new(false);
        let served = std::thread::scope(|s| {
            // Everything the device returns goes straight back on the
            // available ring, with a kick: the ring never empties.
            let driver = s.spawn(|| {
                let mut next = 0u16;
                post(&mem, &mut next, QUEUE);
                kick.write(1).unwrap();
                let mut seen = 0u16;
                let mut served = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
                    let n = used.wrapping_sub(seen);
                    if n > 0 {
                        post(&mem, &mut next, n);
                        kick.write(1).unwrap();
                        seen = used;
                        served += u64::from(n);
                    }
                    std::thread::yield_now();
                }
                served
            });
            rng.activate(ctx).unwrap();
            // The flood is on: the device returned more than a ring's worth.
            let used = || mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
            wait_until("the flood to start", || used() > QUEUE);

            let client = s.spawn(|| {
                let replies = converse(connect(&sock), &[HELLO, STATUS], "\"status\"");
                control.quit();
                replies
            });
            let end = run(&control, &signal, Board::default(), &monitor(&server));
            let replies = client.join().unwrap();
            assert_eq!(end.unwrap(), RunEnd::Quit);
            assert!(replies[0].contains("QMP"), "{replies:?}");
            assert!(replies.last().unwrap().contains("\"running\""), "{replies:?}");
            // And the device is still serving it.
            let now = used();
            wait_until("more requests served", || used() != now);
            // Still flooding: the worker must stop (and be joined) anyway.
            assert!(rng.reset());
            stop.store(true, Ordering::SeqCst);
            driver.join().unwrap()
        });
        assert!(served > u64::from(QUEUE), "only {served} requests served");
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn connect(sock: &std::path::Path) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(sock) {
                Ok(st) => {
                    st.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    return st;
                }
                Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends `commands` and reads until a reply contains `until`; returns
    /// everything read, the greeting first.
    fn converse(stream: UnixStream, commands: &[&str], until: &str) -> Vec<String> {
        let mut w = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream).lines();
        let mut replies = vec![lines.next().expect("a greeting").expect("read")];
        for c in commands {
            w.write_all(c.as_bytes()).unwrap();
        }
        while !replies.last().unwrap().contains(until) {
            replies.push(lines.next().expect("a reply").expect("read"));
        }
        replies
    }

    /// Ends the run when the client thread ends, even by a failed
    /// assertion: the test fails instead of hanging.
    struct QuitOnDrop<'a>(&'a Control);

    impl Drop for QuitOnDrop<'_> {
        fn drop(&mut self) {
            self.0.quit();
        }
    }

    fn qmp_server(
        dir: &std::path::Path,
        name: &str,
    ) -> (Arc<Mutex<QmpServer>>, std::path::PathBuf) {
        let sock = dir.join(name);
        let cfg = QmpConfig { address: QmpAddress::Unix(sock.clone()), wait: false };
        (Arc::new(Mutex::new(QmpServer::bind(&cfg).unwrap())), sock)
    }

    const HELLO: &str = "{\"execute\":\"qmp_capabilities\"}\n";
    const STATUS: &str = "{\"execute\":\"query-status\"}\n";

    /// Clients that send commands and close without reading the replies
    /// (microvm.nix's shutdown script when it is killed, systemd giving
    /// up): each leaves epoll before its socket closes, so the next client,
    /// often on the same descriptor number, is greeted and answered.
    #[test]
    fn qmp_answers_after_clients_that_closed_without_reading() {
        let dir = std::env::temp_dir().join(format!("skiff-qmp-deaf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, sock) = qmp_server(&dir, "qmp.sock");
        let control = Arc::new(Control::new().unwrap());
        let signal = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let replies = std::thread::scope(|s| {
            let client = s.spawn(|| {
                let _quit = QuitOnDrop(&control);
                for _ in 0..3 {
                    // Greeted (so skiff watches it), then gone before the
                    // replies: skiff's writes find it closed.
                    let st = connect(&sock);
                    let mut w = st.try_clone().unwrap();
                    let mut greeting = String::new();
                    BufReader::new(st).read_line(&mut greeting).unwrap();
                    assert!(greeting.contains("QMP"), "{greeting}");
                    w.write_all(HELLO.as_bytes()).unwrap();
                    w.write_all(STATUS.as_bytes()).unwrap();
                }
                let replies = converse(connect(&sock), &[HELLO, STATUS], "\"status\"");
                control.quit();
                replies
            });
            let end = run(&control, &signal, Board::default(), &monitor(&server));
            assert_eq!(end.unwrap(), RunEnd::Quit);
            client.join().unwrap()
        });
        assert!(replies[0].contains("QMP"), "{replies:?}");
        assert!(replies.last().unwrap().contains("\"running\""), "{replies:?}");
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A client that sends thousands of commands and does not read: the
    /// replies wait in its own buffer (more than its socket holds), not in
    /// the event loop, so a client of the other QMP socket is answered
    /// meanwhile; and when the first one reads at last, every reply is
    /// there (blocking writes timed out and dropped it, replies lost).
    #[test]
    fn a_client_that_does_not_read_does_not_hold_up_another() {
        const N: usize = 8192;
        let dir = std::env::temp_dir().join(format!("skiff-qmp-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (slow_server, slow_sock) = qmp_server(&dir, "slow.sock");
        let (server, sock) = qmp_server(&dir, "qmp.sock");
        let control = Arc::new(Control::new().unwrap());
        let signal = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let servers = [slow_server, server];
        let (replies, slow_replies) = std::thread::scope(|s| {
            let client = s.spawn(|| {
                let _quit = QuitOnDrop(&control);
                let slow = connect(&slow_sock);
                let mut w = slow.try_clone().unwrap();
                w.write_all(HELLO.as_bytes()).unwrap();
                w.write_all(STATUS.repeat(N).as_bytes()).unwrap();
                let replies = converse(connect(&sock), &[HELLO, STATUS], "\"status\"");
                // Now read everything skiff has for the slow one.
                let mut lines = BufReader::new(slow).lines();
                let mut running = 0;
                while running < N {
                    match lines.next() {
                        Some(Ok(l)) => running += usize::from(l.contains("\"running\"")),
                        _ => break,
                    }
                }
                control.quit();
                (replies, running)
            });
            let both = |c: &Controls| -> Vec<crate::vm::Subscriber> {
                servers.iter().flat_map(|s| monitor(s)(c)).collect()
            };
            let end = run(&control, &signal, Board::default(), &both);
            assert_eq!(end.unwrap(), RunEnd::Quit);
            client.join().unwrap()
        });
        assert!(replies.last().unwrap().contains("\"running\""), "{replies:?}");
        assert_eq!(slow_replies, N, "every reply reached the client that read late");
        drop(servers);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
