//! QEMU's firmware configuration device (`docs/specs/fw_cfg.rst`) as x86
//! machines have it at I/O port 0x510: a selector (16-bit write at 0x510),
//! a byte-wide data port (0x511) and the DMA interface (0x514: the guest
//! writes the address of an `FWCfgDmaAccess`, big-endian, high half then
//! low half; the low half starts the transfer).
//!
//! Items are fixed at start (`FwCfgItems`): the signature, the ID with the
//! DMA feature, the file directory and the VMM's files. The guest cannot
//! change them (a write is answered with the error bit, as QEMU without
//! `x-fw-cfg-write`), so every run, reboots included, sees the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::virtio::GuestMemoryMmap;

/// The ports: selector 0x510 (2 bytes; its second byte is the data port
/// 0x511), DMA address 0x514 (8 bytes).
pub const FW_CFG_PORT: u16 = 0x510;
pub const FW_CFG_PORT_LEN: u16 = 12;
const DATA_OFFSET: u64 = 1;
const DMA_OFFSET: u64 = 4;

pub const KEY_SIGNATURE: u16 = 0x0000;
pub const KEY_ID: u16 = 0x0001;
pub const KEY_FILE_DIR: u16 = 0x0019;
/// The first file's key; files take the keys after it in name order.
pub const KEY_FILE_FIRST: u16 = 0x0020;
/// Legacy bits of a selector that name no separate item here.
const KEY_WRITE_CHANNEL: u16 = 0x4000;

/// Bytes of a file name, its NUL included (`FWCfgFile.name`).
pub const FILE_NAME_LEN: usize = 56;
/// QEMU's directory holds at most this many files (`FW_CFG_FILE_SLOTS`).
pub const MAX_FILES: usize = 0x20;

const ID_TRADITIONAL: u32 = 1 << 0;
const ID_DMA: u32 = 1 << 1;

const DMA_ERROR: u32 = 1 << 0;
const DMA_READ: u32 = 1 << 1;
const DMA_SKIP: u32 = 1 << 2;
const DMA_SELECT: u32 = 1 << 3;
const DMA_WRITE: u32 = 1 << 4;
/// What a read of the DMA port answers: "QEMU CFG", big-endian.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error("fw_cfg name '{0}' is longer than {max} bytes", max = FILE_NAME_LEN - 1)]
    NameTooLong(String),
    #[error("fw_cfg name '{0}' is empty or has a NUL byte")]
    BadName(String),
    #[error("fw_cfg name '{0}' is given twice")]
    Duplicate(String),
    #[error("fw_cfg has room for {MAX_FILES} files")]
    TooMany,
    #[error("fw_cfg item '{0}' of {1} bytes is larger than 4 GiB")]
    TooLarge(String, usize),
}

/// Everything the guest can read, built once per process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwCfgItems {
    /// Items by key, the standard ones and the file directory included.
    items: BTreeMap<u16, Arc<[u8]>>,
    files: BTreeMap<String, Arc<[u8]>>,
}

impl FwCfgItems {
    /// The items every fw_cfg has: the signature and the ID (DMA offered).
    pub fn new() -> Self {
        let mut items = FwCfgItems::default();
        items.items.insert(KEY_SIGNATURE, Arc::from(&b"QEMU"[..]));
        items.items.insert(KEY_ID, Arc::from(&(ID_TRADITIONAL | ID_DMA).to_le_bytes()[..]));
        items.rebuild_files();
        items
    }

    /// A fixed item (QEMU's `fw_cfg_add_bytes`).
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, Arc::from(data));
    }

    /// A named file (QEMU's `fw_cfg_add_file`), listed in the directory.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), ItemError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(ItemError::NameTooLong(name.into()));
        }
        if name.is_empty() || name.contains('\0') {
            return Err(ItemError::BadName(name.into()));
        }
        if self.files.contains_key(name) {
            return Err(ItemError::Duplicate(name.into()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(ItemError::TooMany);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(ItemError::TooLarge(name.into(), data.len()));
        }
        self.files.insert(name.into(), Arc::from(data));
        self.rebuild_files();
        Ok(())
    }

    /// The directory and the files' keys: in name order (as QEMU sorts
    /// them), from `KEY_FILE_FIRST`.
    fn rebuild_files(&mut self) {
        self.items.retain(|&k, _| k < KEY_FILE_FIRST && k != KEY_FILE_DIR);
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.iter().enumerate() {
            let key = KEY_FILE_FIRST + i as u16;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FILE_NAME_LEN];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
            self.items.insert(key, data.clone());
        }
        self.items.insert(KEY_FILE_DIR, Arc::from(dir));
    }

    fn get(&self, key: u16) -> &[u8] {
        self.items.get(&key).map_or(&[], |d| d)
    }
}

/// The device of one run.
pub struct FwCfg {
    items: Arc<FwCfgItems>,
    mem: GuestMemoryMmap,
    key: u16,
    offset: usize,
    /// The high half of the DMA descriptor's address, until the low half.
    dma_high: u32,
}

impl FwCfg {
    pub fn new(items: Arc<FwCfgItems>, mem: GuestMemoryMmap) -> Self {
        FwCfg { items, mem, key: KEY_SIGNATURE, offset: 0, dma_high: 0 }
    }

    fn select(&mut self, key: u16) {
        self.key = key & !KEY_WRITE_CHANNEL;
        self.offset = 0;
    }

    fn current(&self) -> &[u8] {
        self.items.get(self.key)
    }

    /// One byte of the selected item; past its end, 0.
    fn read_data(&mut self) -> u8 {
        let byte = self.current().get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }

    /// Carries out the `FWCfgDmaAccess` at `at` and writes its control
    /// word back: 0 when done, the error bit otherwise.
    fn dma(&mut self, at: u64) {
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, GuestAddress(at)).is_err() {
            self.dma_status(at, DMA_ERROR);
            return;
        }
        let word = |i: usize| u32::from_be_bytes(desc[i..i + 4].try_into().unwrap_or_default());
        let control = word(0);
        let len = word(4) as usize;
        let address = u64::from(word(8)) << 32 | u64::from(word(12));
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let status = if control & DMA_READ != 0 {
            self.dma_read(address, len)
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(len);
            0
        } else if control & DMA_WRITE != 0 {
            // Items are read-only (QEMU without x-fw-cfg-write).
            DMA_ERROR
        } else {
            0
        };
        self.dma_status(at, status);
    }

    /// `len` bytes of the item into guest memory at `address`; what lies
    /// past the item's end reads as zeros.
    fn dma_read(&mut self, address: u64, len: usize) -> u32 {
        let items = self.items.clone();
        let data = items.get(self.key);
        let from = self.offset.min(data.len());
        let copied = len.min(data.len() - from);
        if self.mem.write_slice(&data[from..from + copied], GuestAddress(address)).is_err() {
            return DMA_ERROR;
        }
        let zeros = [0u8; 4096];
        let mut done = copied;
        while done < len {
            let n = (len - done).min(zeros.len());
            let Some(at) = address.checked_add(done as u64) else { return DMA_ERROR };
            if self.mem.write_slice(&zeros[..n], GuestAddress(at)).is_err() {
                return DMA_ERROR;
            }
            done += n;
        }
        self.offset = self.offset.saturating_add(len);
        0
    }

    fn dma_status(&self, at: u64, status: u32) {
        // Nowhere to report a descriptor that is not in RAM.
        let _ = self.mem.write_slice(&status.to_be_bytes(), GuestAddress(at));
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            DATA_OFFSET if data.len() == 1 => data[0] = self.read_data(),
            DMA_OFFSET..=11 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                let at = (offset - DMA_OFFSET) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(at + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_OFFSET, 4) => {
                self.dma_high = u32::from_be_bytes(data.try_into().unwrap_or_default());
            }
            (8, 4) => {
                let low = u32::from_be_bytes(data.try_into().unwrap_or_default());
                let at = u64::from(self.dma_high) << 32 | u64::from(low);
                self.dma_high = 0;
                self.dma(at);
            }
            (DMA_OFFSET, 8) => {
                let at = u64::from_be_bytes(data.try_into().unwrap_or_default());
                self.dma(at);
            }
            // The data port's writes (obsolete) and odd widths: ignored.
            _ => {}
        }
    }
}

/// The DSDT's `FWCF` node, as QEMU's `fw_cfg_add_acpi_dsdt` writes it:
/// how Linux's `qemu_fw_cfg` finds the device.
pub fn aml() -> Vec<u8> {
    let hid: &str = "QEMU0002";
    let sta: u8 = 0x0b;
    let port = FW_CFG_PORT;
    crate::aml::isa_device(
        "FWCF",
        &[("_HID", &hid), ("_STA", &sta)],
        vec![&acpi_tables::aml::IO::new(port, port, 1, FW_CFG_PORT_LEN as u8)],
    )
}

/// One input of `fuzz_fw_cfg` (also a libFuzzer target): a hostile
/// guest's port accesses and DMA descriptors against items of any size.
/// Whatever it does, an item read back through the data port from its
/// start is its bytes, and nothing a guest does changes an item.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_ports(rng: &mut skiff_tests::fuzz::Rng) {
    const RAM: u64 = 0x2_0000;
    let mut items = FwCfgItems::new();
    let file: Vec<u8> = rng.bytes(3000);
    let _ = items.add_file("opt/a", file.clone());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap_or_default();
    let mut d = FwCfg::new(Arc::new(items), mem);
    for _ in 0..rng.below(40) {
        let offset = rng.below(14);
        let len = *rng.pick(&[1usize, 2, 4, 8]);
        if rng.one_in(3) {
            let mut data = [0u8; 8];
            d.read(offset, &mut data[..len]);
            continue;
        }
        if rng.one_in(3) {
            // A descriptor in RAM (or not), then its address.
            let at = if rng.one_in(4) { rng.interesting() } else { rng.below(RAM) };
            let keys = [0x20u16, KEY_FILE_DIR, KEY_ID, rng.interesting() as u16];
            let control = (u32::from(*rng.pick(&keys)) << 16) | rng.below(32) as u32;
            let length = if rng.one_in(2) { rng.below(0x4000) } else { rng.interesting() } as u32;
            let address = if rng.one_in(4) { rng.interesting() } else { rng.below(RAM) };
            let mut desc = control.to_be_bytes().to_vec();
            desc.extend_from_slice(&length.min(1 << 20).to_be_bytes());
            desc.extend_from_slice(&address.to_be_bytes());
            let _ = d.mem.write_slice(&desc, GuestAddress(at));
            d.write(DMA_OFFSET, &((at >> 32) as u32).to_be_bytes());
            d.write(8, &(at as u32).to_be_bytes());
            continue;
        }
        d.write(offset, &rng.interesting().to_le_bytes()[..len]);
    }
    d.write(0, &0x20u16.to_le_bytes());
    let back: Vec<u8> = (0..file.len())
        .map(|_| {
            let mut b = [0u8];
            d.read(DATA_OFFSET, &mut b);
            b[0]
        })
        .collect();
    assert!(back == file, "the file read back");
}

#[cfg(test)]
#[test]
fn fuzz_fw_cfg() {
    skiff_tests::fuzz::run("fw-cfg", 20_000, fuzz_ports);
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 0x40_0000;

    fn device(items: FwCfgItems) -> FwCfg {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        FwCfg::new(Arc::new(items), mem)
    }

    fn select(d: &mut FwCfg, key: u16) {
        d.write(0, &key.to_le_bytes());
    }

    fn read_bytes(d: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                d.read(DATA_OFFSET, &mut b);
                b[0]
            })
            .collect()
    }

    /// Writes a descriptor at `at` and starts it as Linux does: the high
    /// half, then the low half.
    fn dma(d: &mut FwCfg, at: u64, control: u32, len: u32, address: u64) -> u32 {
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&address.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(at)).unwrap();
        d.write(DMA_OFFSET, &((at >> 32) as u32).to_be_bytes());
        d.write(8, &(at as u32).to_be_bytes());
        let mut back = [0u8; 4];
        d.mem.read_slice(&mut back, GuestAddress(at)).unwrap();
        u32::from_be_bytes(back)
    }

    /// The signature and ID through the data port; the DMA port reads as
    /// "QEMU CFG"; past an item's end the port reads 0.
    #[test]
    fn signature_id_and_the_dma_signature() {
        let mut d = device(FwCfgItems::new());
        select(&mut d, KEY_SIGNATURE);
        assert_eq!(read_bytes(&mut d, 6), b"QEMU\0\0");
        select(&mut d, KEY_ID);
        assert_eq!(read_bytes(&mut d, 4), [3, 0, 0, 0], "traditional and DMA");
        let mut sig = [0u8; 4];
        d.read(DMA_OFFSET, &mut sig);
        assert_eq!(&sig, b"QEMU");
        d.read(8, &mut sig);
        assert_eq!(&sig, b" CFG");
        select(&mut d, 0x1234);
        assert_eq!(read_bytes(&mut d, 2), [0, 0], "no such item");
    }

    /// The directory: a big-endian count, then per file its size, key and
    /// name, sorted by name with keys from 0x20; a file's bytes behind its
    /// key.
    #[test]
    fn the_file_directory() {
        let mut items = FwCfgItems::new();
        items.add_file("opt/io.systemd.credentials/b", b"second".to_vec()).unwrap();
        items.add_file("opt/io.systemd.credentials/a", b"first!".to_vec()).unwrap();
        let mut d = device(items);
        select(&mut d, KEY_FILE_DIR);
        let dir = read_bytes(&mut d, 4 + 2 * 64);
        assert_eq!(dir[..4], [0, 0, 0, 2]);
        let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
        assert_eq!(entry(0)[..8], [0, 0, 0, 6, 0, 0x20, 0, 0]);
        assert!(entry(0)[8..].starts_with(b"opt/io.systemd.credentials/a\0"));
        assert_eq!(entry(1)[4..6], [0, 0x21]);
        select(&mut d, 0x21);
        assert_eq!(read_bytes(&mut d, 6), b"second");
    }

    /// The names QEMU refuses.
    #[test]
    fn names_are_checked() {
        let mut items = FwCfgItems::new();
        let long = "o".repeat(56);
        assert_eq!(items.add_file(&long, vec![]), Err(ItemError::NameTooLong(long.clone())));
        items.add_file(&long[..55], vec![]).unwrap();
        assert_eq!(
            items.add_file(&long[..55], vec![]),
            Err(ItemError::Duplicate(long[..55].into()))
        );
        assert!(matches!(items.add_file("", vec![]), Err(ItemError::BadName(_))));
        for i in 1..MAX_FILES {
            items.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(items.add_file("one-more", vec![]), Err(ItemError::TooMany));
    }

    /// A multi-MiB item through DMA, byte-exact, in pieces with a skip
    /// between them; what lies past the end reads as zeros; a write or a
    /// descriptor outside RAM gets the error bit.
    #[test]
    fn dma_reads_skips_and_errors() {
        let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 4096) as u8).collect();
        let mut items = FwCfgItems::new();
        items.add_file("opt/big", big.clone()).unwrap();
        let mut d = device(items);
        let buf = 0x10_0000;
        let select_read = (0x20u32 << 16) | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut d, 0x1000, select_read, 1 << 20, buf), 0);
        let mut got = vec![0u8; 1 << 20];
        d.mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert!(got == big[..1 << 20]);
        assert_eq!(dma(&mut d, 0x1000, DMA_SKIP, 1 << 20, 0), 0);
        // The last MiB and 16 bytes more: zeros after the item's end.
        d.mem.write_slice(&[0xaa; 16], GuestAddress(buf + (1 << 20))).unwrap();
        assert_eq!(dma(&mut d, 0x1000, DMA_READ, (1 << 20) + 16, buf), 0);
        let mut got = vec![0u8; (1 << 20) + 16];
        d.mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert!(got[..1 << 20] == big[2 << 20..]);
        assert_eq!(got[1 << 20..], [0; 16]);
        // The guest cannot write an item.
        assert_eq!(dma(&mut d, 0x1000, (0x20 << 16) | DMA_SELECT | DMA_WRITE, 4, buf), DMA_ERROR);
        // A transfer that runs out of RAM fails; so does a descriptor there.
        assert_eq!(dma(&mut d, 0x1000, select_read, 64, RAM - 8), DMA_ERROR);
        d.write(DMA_OFFSET, &0u32.to_be_bytes());
        d.write(8, &((RAM + 0x1000) as u32).to_be_bytes());
        // Selecting by DMA resets the offset, as the selector port does.
        assert_eq!(dma(&mut d, 0x1000, select_read, 4, buf), 0);
        let mut four = [0u8; 4];
        d.mem.read_slice(&mut four, GuestAddress(buf)).unwrap();
        assert_eq!(four, big[..4]);
    }
}
