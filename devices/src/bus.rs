//! An address space (port I/O or MMIO) mapping ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range the
/// device was inserted at; `data.len()` is the access width (1, 2, 4 or 8).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("empty range at {0:#x}")]
    EmptyRange(u64),
}

struct Entry {
    len: u64,
    /// Added to the offset within the range, for devices that answer at
    /// several discontiguous ranges (the i8042 at 0x60 and 0x64).
    dev_offset: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// vCPU threads share the bus; an access takes the map's read lock only to
/// find the device, then locks just that device. Ranges change only when
/// the guest moves a PCI BAR (`remove` + `insert`), which a vCPU does while
/// holding no bus lock, so a move cannot deadlock against an access.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_at_offset(device, base, len, 0)
    }

    /// Like `insert`, but the device sees offsets starting at `dev_offset`.
    pub fn insert_at_offset(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
        dev_offset: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = base.saturating_add(len);
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The only candidates for overlap: the last range starting below `end`.
        if let Some((&other, e)) = ranges.range(..end).next_back() {
            if other.saturating_add(e.len) > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        ranges.insert(base, Entry { len, dev_offset, device });
        Ok(())
    }

    /// Removes the range starting at `base`; returns its device.
    pub fn remove(&self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).map(|e| e.device)
    }

    /// The device at `addr` and the offset it sees; the map lock is released
    /// before the caller locks the device.
    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (addr - base + e.dev_offset, e.device.clone()))
    }

    /// Returns false when no device claims `addr`; `data` is then untouched.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device that panicked while holding its lock is left as it was: the
/// process aborts on panic (release profile), so poisoning only matters in
/// tests, where we want to see the state anyway.
fn lock(dev: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.write(0x3f7, &[0]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![0x41])]);
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        bus.insert(dev.clone(), 0x64, 1).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x5f, 2),
            Err(BusError::Overlap { base: 0x5f, len: 2, other: 0x60 })
        );
        assert_eq!(bus.insert(dev.clone(), 0x61, 0), Err(BusError::EmptyRange(0x61)));
        // Adjacent ranges are fine.
        bus.insert(dev, 0x61, 3).unwrap();
    }

    #[test]
    fn removed_range_can_move() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.remove(0x1000).is_some());
        assert!(bus.remove(0x1000).is_none());
        assert!(!bus.write(0x1000, &[1]));
        bus.insert(dev.clone(), 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2004, &[2]));
        assert_eq!(dev.lock().unwrap().writes, vec![(4, vec![2])]);
    }

    #[test]
    fn second_window_sees_its_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        bus.insert_at_offset(dev.clone(), 0x64, 1, 4).unwrap();
        bus.write(0x64, &[0xfe]);
        bus.write(0x60, &[0xf4]);
        let mut b = [0u8];
        assert!(!bus.read(0x61, &mut b));
        assert_eq!(dev.lock().unwrap().writes, vec![(4, vec![0xfe]), (0, vec![0xf4])]);
    }
}
