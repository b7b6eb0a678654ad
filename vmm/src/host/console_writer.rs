//! Guest console output that a stalled reader cannot block.
//!
//! The UART hands every byte the guest writes to `ConsoleSink`. While the
//! output takes data, the sink writes it at once, on the vCPU's thread, as
//! before (a `poll` first says there is room, so the write cannot block).
//! When the output is full (a pipe nobody reads, a paused terminal), bytes
//! go to a buffer instead and a writer thread waits for the reader and
//! drains it; the vCPU, the UART lock, the event loop and QMP never wait.
//! If the reader stays away until the buffer is full, further output is
//! dropped and a line in the stream says how much once the reader is back.
//! Writing directly in the common case keeps the extra thread idle: waking
//! it for every byte made the nested test host's guests noticeably flakier.
//!
//! At the end of a run `ConsoleWriter::finish` (also its `Drop`) writes what
//! is left, waiting at most a deadline, so scripts see the guest's last
//! words before skiff's exit status.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Buffered output beyond this is dropped while the reader is away.
const CAPACITY: usize = 1 << 20;
/// How long the end of a run waits for the reader to take the rest.
const FINISH_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    dropped: u64,
    closed: bool,
    /// The writer thread is writing a chunk it took from `buf`: a direct
    /// write now would overtake it.
    in_flight: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UART's side: never blocks on the output.
pub struct ConsoleSink {
    shared: Arc<Shared>,
    capacity: usize,
    /// The output, for writes on the caller's thread when it has room.
    direct: Option<File>,
}

/// Whether a write to `file` would not block now. For a pipe, poll's
/// POLLOUT means room for at least PIPE_BUF bytes; the UART writes one.
fn writable_now(file: &File) -> bool {
    let mut p = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, for a descriptor `file` keeps open; a zero
    // timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLOUT != 0
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut s = self.shared.lock();
        let mut rest = data;
        if s.buf.is_empty() && !s.in_flight {
            if let Some(f) = self.direct.as_mut().filter(|f| writable_now(f)) {
                // Errors other than a full output are the writer thread's to
                // meet; the bytes then go through it.
                if let Ok(n) = f.write(rest) {
                    rest = &rest[n..];
                }
            }
        }
        if !rest.is_empty() {
            let room = self.capacity.saturating_sub(s.buf.len());
            let take = rest.len().min(room);
            let was_empty = s.buf.is_empty();
            s.buf.extend(&rest[..take]);
            s.dropped += (rest.len() - take) as u64;
            drop(s);
            if was_empty {
                self.shared.wake.notify_one();
            }
        }
        // The guest's byte is "sent" either way, as on a UART whose cable
        // nobody listens on.
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Owns the writer thread.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer for `file`; returns the sink for the UART and the
/// handle that finishes the output at the end of the run.
pub fn spawn(file: File) -> std::io::Result<(ConsoleSink, ConsoleWriter)> {
    let direct = file.try_clone()?;
    spawn_with(Box::new(file), Some(direct), CAPACITY)
}

fn spawn_with(
    mut out: Box<dyn Write + Send>,
    direct: Option<File>,
    capacity: usize,
) -> std::io::Result<(ConsoleSink, ConsoleWriter)> {
    let shared = Arc::new(Shared::default());
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || write_loop(&thread_shared, &mut *out))?;
    let sink = ConsoleSink { shared: shared.clone(), capacity, direct };
    Ok((sink, ConsoleWriter { shared, thread: Some(thread) }))
}

fn write_loop(shared: &Shared, out: &mut dyn Write) {
    crate::host::sandbox::confine(crate::host::sandbox::ThreadKind::Console);
    let mut broken = false;
    loop {
        let mut s = shared.lock();
        while s.buf.is_empty() && !s.closed {
            s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.buf.is_empty() {
            return;
        }
        let chunk: Vec<u8> = s.buf.drain(..).collect();
        let dropped = std::mem::take(&mut s.dropped);
        s.in_flight = true;
        drop(s);
        if !broken {
            // A reader that went away (EPIPE) takes no more; the guest keeps
            // running, as QEMU's does.
            broken = write_fully(out, &chunk).is_err();
            if dropped > 0 && !broken {
                let note = format!("\r\n[skiff: {dropped} bytes of guest output dropped]\r\n");
                broken = write_fully(out, note.as_bytes()).is_err();
            }
        }
        shared.lock().in_flight = false;
    }
}

/// Writes all of `data`, waiting out a full non-blocking output: the
/// descriptor may be shared with a terminal or pipe someone else made
/// non-blocking (stdin and stdout are often one open file), and EAGAIN
/// there means "later", not "gone".
fn write_fully(out: &mut dyn Write, mut data: &[u8]) -> std::io::Result<()> {
    use std::io::ErrorKind;
    while !data.is_empty() {
        match out.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    out.flush()
}

impl ConsoleWriter {
    /// Writes what is buffered and stops the thread, waiting at most
    /// `FINISH_DEADLINE` for a slow reader; a thread still blocked after
    /// that is left behind (the process is about to exit or restart).
    pub fn finish(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        let deadline = Instant::now() + FINISH_DEADLINE;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                devices::warn_limited!("console output still blocked at exit; the rest is dropped");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An output that records what it got, and blocks while `gate` is held.
    #[derive(Clone, Default)]
    struct Recorder {
        got: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let _g = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_arrives_in_order_and_finish_flushes_it() {
        let rec = Recorder::default();
        let (mut sink, mut writer) = spawn_with(Box::new(rec.clone()), None, CAPACITY).unwrap();
        for i in 0..1000u32 {
            sink.write_all(format!("{i},").as_bytes()).unwrap();
        }
        writer.finish();
        let want: String = (0..1000u32).map(|i| format!("{i},")).collect();
        assert_eq!(String::from_utf8(rec.got.lock().unwrap().clone()).unwrap(), want);
    }

    #[test]
    fn a_stalled_reader_never_blocks_the_guest() {
        let rec = Recorder::default();
        let gate = rec.gate.lock().unwrap();
        let (mut sink, mut writer) = spawn_with(Box::new(rec.clone()), None, 16).unwrap();
        // The writer takes the first bytes and blocks on the gate; the
        // guest keeps writing, well past the capacity, without blocking.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..100 {
                sink.write_all(b"0123456789").unwrap();
            }
            tx.send(sink).unwrap();
        });
        let _sink = rx.recv_timeout(Duration::from_secs(5)).expect("the guest side blocked");
        drop(gate);
        writer.finish();
        let got = String::from_utf8(rec.got.lock().unwrap().clone()).unwrap();
        assert!(got.contains("bytes of guest output dropped]"), "{got}");
        assert!(got.len() < 1000, "most of it was dropped: {}", got.len());
        assert!(got.starts_with("0123456789"), "{got}");
    }

    /// An output that takes at most 3 bytes a call and says EAGAIN every
    /// other call, as a busy non-blocking pipe does.
    struct Choppy {
        got: Arc<Mutex<Vec<u8>>>,
        calls: usize,
    }

    impl Write for Choppy {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = data.len().min(3);
            self.got.lock().unwrap().extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_non_blocking_output_loses_nothing() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let (mut sink, mut writer) =
            spawn_with(Box::new(Choppy { got: got.clone(), calls: 0 }), None, CAPACITY).unwrap();
        for i in 0..200u32 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        writer.finish();
        let want: String = (0..200u32).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(got.lock().unwrap().clone()).unwrap(), want);
    }

    /// Through a real pipe: written directly while it has room, through
    /// the thread once it is full and nobody reads, in order either way.
    #[test]
    fn a_full_pipe_switches_to_the_writer_and_keeps_the_order() {
        use std::io::Read;
        let (mut reader, writer_end) = std::io::pipe().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(writer_end));
        let (mut sink, mut writer) = spawn(file).unwrap();
        // 256 KiB is more than a pipe holds (64 KiB): nobody reads yet, and
        // the guest side must not block.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..32768u32 {
                sink.write_all(&(i as u64).to_le_bytes()).unwrap();
            }
            tx.send(sink).unwrap();
        });
        let sink = rx.recv_timeout(Duration::from_secs(10)).expect("the guest side blocked");
        let read_all = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        writer.finish();
        drop(writer);
        drop(sink);
        let got = read_all.join().unwrap();
        let want: Vec<u8> = (0..32768u64).flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "out of order");
    }

    #[test]
    fn finish_gives_up_on_a_reader_that_never_returns() {
        let rec = Recorder::default();
        let gate = rec.gate.clone();
        let held = gate.lock().unwrap();
        let (mut sink, mut writer) = spawn_with(Box::new(rec), None, CAPACITY).unwrap();
        sink.write_all(b"stuck").unwrap();
        let t0 = Instant::now();
        writer.finish();
        assert!(t0.elapsed() < FINISH_DEADLINE + Duration::from_secs(2));
        drop(held);
    }
}
