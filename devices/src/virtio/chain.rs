//! A descriptor chain read from guest memory once, and checked.
//!
//! The driver may rewrite a chain's descriptors while the device works on
//! it; reading them twice (once to check, once to use) would let it pass
//! the check with one chain and have the device use another. So a device
//! collects the chain's descriptors into a `Chain` once and works on that
//! copy. The copy is bounded: a chain longer than the queue (counting
//! the entries of an indirect table) is refused, as the driver "MUST NOT"
//! build one (virtio 1.2, 2.7.5.3.1), so a guest cannot make the device
//! walk 65,535 indirect descriptors per request.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory, Permissions};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("chain loops, is longer than the queue ({max} descriptors) or points past it")]
    TooLong { max: usize },
    #[error("chain ends in a descriptor that cannot be read")]
    Unterminated,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// The head index the chain came from and its descriptors in order.
#[derive(Debug)]
pub struct Chain {
    pub head: u16,
    pub descriptors: Vec<Descriptor>,
}

impl Chain {
    /// Reads `chain` (at most `max` descriptors) and checks that every
    /// buffer lies in guest memory with the access its direction needs.
    pub fn read<M>(
        mem: &impl GuestMemory,
        chain: DescriptorChain<M>,
        max: usize,
    ) -> Result<Chain, ChainError>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut descriptors = Vec::new();
        // The iterator stops silently on a loop, an index past the table or
        // an unreadable descriptor; a last descriptor still claiming NEXT
        // tells, as does running past `max`.
        let mut last_has_next = false;
        for d in chain.take(max + 1) {
            if descriptors.len() == max {
                return Err(ChainError::TooLong { max });
            }
            last_has_next = d.has_next();
            let access = if d.is_write_only() { Permissions::Write } else { Permissions::Read };
            if d.len() > 0 && !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(ChainError::OutsideMemory { addr: d.addr().0, len: d.len() });
            }
            descriptors.push(d);
        }
        if last_has_next {
            return Err(ChainError::Unterminated);
        }
        Ok(Chain { head, descriptors })
    }

    /// The device-writable buffers, in order.
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| d.is_write_only())
    }

    /// Copies `data` into the device-writable buffers, in order; returns
    /// how much fit (a buffer that cannot be written ends the copy).
    pub fn write_from(&self, mem: &impl GuestMemory, data: &[u8]) -> usize {
        let mut done = 0;
        for d in self.writable() {
            if done == data.len() {
                break;
            }
            let n = (d.len() as usize).min(data.len() - done);
            if mem.write_slice(&data[done..done + n], d.addr()).is_err() {
                break;
            }
            done += n;
        }
        done
    }
}

/// A chain's device-readable buffers as one stream, read in place from
/// guest memory (a message decoded without copying it first).
pub struct ChainReader<'a, M> {
    mem: &'a M,
    chain: &'a Chain,
    /// The descriptor being read and how far into it.
    at: usize,
    offset: u32,
}

impl<'a, M: GuestMemory> ChainReader<'a, M> {
    pub fn new(mem: &'a M, chain: &'a Chain) -> Self {
        ChainReader { mem, chain, at: 0, offset: 0 }
    }
}

impl<M: GuestMemory> std::io::Read for ChainReader<'_, M> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(d) = self.chain.descriptors.get(self.at) {
            let left = d.len() - self.offset;
            if d.is_write_only() || left == 0 {
                self.at += 1;
                self.offset = 0;
                continue;
            }
            let n = (left as usize).min(buf.len());
            let addr = d.addr().unchecked_add(u64::from(self.offset));
            // `Chain::read` checked the buffer; a failure is the guest's doing.
            self.mem.read_slice(&mut buf[..n], addr).map_err(std::io::Error::other)?;
            self.offset += n as u32;
            return Ok(n);
        }
        Ok(0)
    }
}

/// A chain's device-writable buffers as one stream, written in place in
/// guest memory. Past their end, writes fail (`WriteZero` from
/// `write_all`); `written` says how much went in.
pub struct ChainWriter<'a, M> {
    mem: &'a M,
    chain: &'a Chain,
    at: usize,
    offset: u32,
    pub written: usize,
}

impl<'a, M: GuestMemory> ChainWriter<'a, M> {
    pub fn new(mem: &'a M, chain: &'a Chain) -> Self {
        ChainWriter { mem, chain, at: 0, offset: 0, written: 0 }
    }
}

impl<M: GuestMemory> std::io::Write for ChainWriter<'_, M> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        while let Some(d) = self.chain.descriptors.get(self.at) {
            let left = d.len() - self.offset;
            if !d.is_write_only() || left == 0 {
                self.at += 1;
                self.offset = 0;
                continue;
            }
            let n = (left as usize).min(buf.len());
            let addr = d.addr().unchecked_add(u64::from(self.offset));
            self.mem.write_slice(&buf[..n], addr).map_err(std::io::Error::other)?;
            self.offset += n as u32;
            self.written += n;
            return Ok(n);
        }
        Ok(0)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueT};

    use super::*;
    use crate::virtio::test_utils::*;

    const MEM: usize = 0x40_0000;

    fn pop(tq: &TestQueue, mem: &crate::virtio::GuestMemoryMmap) -> Result<Chain, ChainError> {
        let mut q: Queue = tq.queue();
        Chain::read(mem, q.pop_descriptor_chain(mem).expect("a chain"), 16)
    }

    #[test]
    fn reads_a_good_chain_once() {
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        tq.add_chain(&[(DATA, 16, 0), (DATA + 16, 32, WRITE)]);
        let c = pop(&tq, &mem).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.descriptors.len(), 2);
        assert_eq!(c.writable().map(|d| d.len()).collect::<Vec<_>>(), [32]);
    }

    #[test]
    fn refuses_loops_and_buffers_outside_memory() {
        let mem = guest_mem(MEM);
        let tq = TestQueue::new(&mem, 16);
        tq.store_desc(0, DATA, 16, WRITE | NEXT, 1);
        tq.store_desc(1, DATA, 16, WRITE | NEXT, 0);
        tq.make_available(0);
        assert_eq!(pop(&tq, &mem).unwrap_err(), ChainError::Unterminated);

        let mut tq = TestQueue::new(&mem, 16);
        tq.add_chain(&[(MEM as u64 - 8, 16, WRITE)]);
        assert!(matches!(pop(&tq, &mem), Err(ChainError::OutsideMemory { .. })));

        let tq = TestQueue::new(&mem, 16);
        tq.store_desc(0, DATA, 16, WRITE | NEXT, 200);
        tq.make_available(0);
        assert_eq!(pop(&tq, &mem).unwrap_err(), ChainError::Unterminated);
    }

    #[test]
    fn reads_and_writes_the_buffers_as_streams() {
        use std::io::{Read, Write};
        let mem = guest_mem(MEM);
        let mut tq = TestQueue::new(&mem, 16);
        for (i, b) in b"abcdefgh".iter().enumerate() {
            fill(&mem, DATA + 0x100 * (i as u64 / 3) + i as u64 % 3, 1, *b);
        }
        // Readable: "abc", nothing, "def", "gh"; writable: 2 and 4 bytes.
        tq.add_chain(&[
            (DATA, 3, 0),
            (DATA + 0x80, 0, 0),
            (DATA + 0x100, 3, 0),
            (DATA + 0x200, 2, 0),
            (DATA + 0x1000, 2, WRITE),
            (DATA + 0x2000, 4, WRITE),
        ]);
        let c = pop(&tq, &mem).unwrap();
        let mut got = Vec::new();
        ChainReader::new(&mem, &c).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abcdefgh");
        let mut w = ChainWriter::new(&mem, &c);
        w.write_all(b"123456").unwrap();
        assert_eq!(
            (read(&mem, DATA + 0x1000, 2), read(&mem, DATA + 0x2000, 4)),
            (b"12".to_vec(), b"3456".to_vec())
        );
        let err = w.write_all(b"7").unwrap_err();
        assert_eq!((err.kind(), w.written), (std::io::ErrorKind::WriteZero, 6));
    }

    #[test]
    fn an_indirect_table_longer_than_the_queue_is_refused_early() {
        let mem = guest_mem(MEM);
        let tq = TestQueue::new(&mem, 16);
        // 65,535 entries, each pointing at the next.
        tq.store_indirect(0, TABLE, u16::MAX, DATA, 1);
        tq.make_available(0);
        assert_eq!(pop(&tq, &mem).unwrap_err(), ChainError::TooLong { max: 16 });
        // 16 entries are fine.
        let tq = TestQueue::new(&mem, 16);
        tq.store_indirect(0, TABLE, 16, DATA, 1);
        tq.make_available(0);
        assert_eq!(pop(&tq, &mem).unwrap().descriptors.len(), 16);
    }
}
