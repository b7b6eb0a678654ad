//! Guest console output written by a thread of its own.
//!
//! The UART hands every byte the guest writes to `ConsoleSink`, which only
//! appends it to a buffer; the writer thread drains the buffer into the real
//! output in as few writes as it can. A slow or stalled reader (a pipe
//! nobody reads, a paused terminal) therefore never blocks a vCPU inside the
//! UART, nor with it the event loop and QMP. If the reader stays away long
//! enough for the buffer to fill, further output is dropped, and a line in
//! the stream says how much once the reader is back.
//!
//! At the end of a run `ConsoleWriter::finish` (also its `Drop`) writes what
//! is left, waiting at most a deadline, so scripts see the guest's last
//! words before skiff's exit status.

use std::collections::VecDeque;
use std::io::Write;
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
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled by the writer when the buffer is empty.
    drained: Condvar,
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
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut s = self.shared.lock();
        let room = self.capacity.saturating_sub(s.buf.len());
        let take = data.len().min(room);
        s.buf.extend(&data[..take]);
        s.dropped += (data.len() - take) as u64;
        drop(s);
        self.shared.wake.notify_one();
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

/// Starts a writer thread for `out`; returns the sink for the UART and the
/// handle that finishes the output at the end of the run.
pub fn spawn(out: Box<dyn Write + Send>) -> std::io::Result<(ConsoleSink, ConsoleWriter)> {
    spawn_with_capacity(out, CAPACITY)
}

fn spawn_with_capacity(
    mut out: Box<dyn Write + Send>,
    capacity: usize,
) -> std::io::Result<(ConsoleSink, ConsoleWriter)> {
    let shared = Arc::new(Shared::default());
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || write_loop(&thread_shared, &mut *out))?;
    let sink = ConsoleSink { shared: shared.clone(), capacity };
    Ok((sink, ConsoleWriter { shared, thread: Some(thread) }))
}

fn write_loop(shared: &Shared, out: &mut dyn Write) {
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
        let empty = shared.lock().buf.is_empty();
        if empty {
            shared.drained.notify_all();
        }
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
                log::warn!("console output still blocked at exit; the rest is dropped");
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
        let (mut sink, mut writer) = spawn(Box::new(rec.clone())).unwrap();
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
        let (mut sink, mut writer) = spawn_with_capacity(Box::new(rec.clone()), 16).unwrap();
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
            if self.calls % 2 == 0 {
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
            spawn(Box::new(Choppy { got: got.clone(), calls: 0 })).unwrap();
        for i in 0..200u32 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        writer.finish();
        let want: String = (0..200u32).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(got.lock().unwrap().clone()).unwrap(), want);
    }

    #[test]
    fn finish_gives_up_on_a_reader_that_never_returns() {
        let rec = Recorder::default();
        let gate = rec.gate.clone();
        let held = gate.lock().unwrap();
        let (mut sink, mut writer) = spawn(Box::new(rec)).unwrap();
        sink.write_all(b"stuck").unwrap();
        let t0 = Instant::now();
        writer.finish();
        assert!(t0.elapsed() < FINISH_DEADLINE + Duration::from_secs(2));
        drop(held);
    }
}
