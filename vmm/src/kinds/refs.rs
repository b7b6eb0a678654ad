//! References from a `-device` to other options (`drive=`, `netdev=`,
//! `fsdev=`, `chardev=`), resolved in one place once the whole command
//! line is read: the option exists, no other device has it, and the device
//! gets the option itself (`Arc<T>`), so nothing looks it up again.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cli::CliError;
use crate::config::{ChardevConfig, DriveConfig, FsdevConfig, NetdevConfig};

/// An option a device may name by id.
pub trait Referable: Sized {
    fn id(&self) -> &str;
    /// QEMU's words when no option has the id.
    fn missing(id: &str) -> String;
    /// QEMU's words when another device has it already.
    fn in_use(id: &str) -> String;
    /// Its pool among the references.
    fn pool(refs: &mut Refs) -> &mut Pool<Self>;
}

/// The options of one type, and which are taken.
pub struct Pool<T> {
    items: Vec<(Arc<T>, bool)>,
}

impl<T> Pool<T> {
    fn new(items: &[T]) -> Self
    where
        T: Clone,
    {
        Pool { items: items.iter().map(|i| (Arc::new(i.clone()), false)).collect() }
    }

    /// Ids nothing took.
    fn unused(&self) -> impl Iterator<Item = &T> {
        self.items.iter().filter(|(_, used)| !used).map(|(t, _)| &**t)
    }
}

/// Every option a device may name, for resolving references.
pub struct Refs {
    drives: Pool<DriveConfig>,
    netdevs: Pool<NetdevConfig>,
    fsdevs: Pool<FsdevConfig>,
    chardevs: Pool<ChardevConfig>,
    /// How many devices of each kind resolved so far (QEMU numbers NICs'
    /// default MACs, and names devices without id, in this order).
    ordinals: HashMap<&'static str, usize>,
    /// The virtio-serial buses resolved so far: a port joins one that
    /// came before it on the command line, as in QEMU.
    pub serial_buses: Vec<super::serial::BusSlot>,
    /// The `id=` of the device being resolved.
    resolving: Option<String>,
}

impl Refs {
    /// `taken_chardevs`: chardevs something other than a device uses
    /// already (a `-serial chardev:ID`).
    pub fn new(
        drives: &[DriveConfig],
        netdevs: &[NetdevConfig],
        fsdevs: &[FsdevConfig],
        chardevs: &[ChardevConfig],
        taken_chardevs: &[&str],
    ) -> Self {
        let mut refs = Refs {
            drives: Pool::new(drives),
            netdevs: Pool::new(netdevs),
            fsdevs: Pool::new(fsdevs),
            chardevs: Pool::new(chardevs),
            ordinals: HashMap::new(),
            serial_buses: Vec::new(),
            resolving: None,
        };
        for (c, used) in &mut refs.chardevs.items {
            *used = taken_chardevs.contains(&c.id.as_str());
        }
        refs
    }

    /// Takes the option named `id` for the device `option` (as
    /// `-device virtio-blk-pci`): it must exist and be free.
    pub fn take<T: Referable>(&mut self, option: &str, id: &str) -> Result<Arc<T>, CliError> {
        let err = |reason| CliError::Invalid { option: option.to_owned(), reason };
        let pool = T::pool(self);
        let Some((item, used)) = pool.items.iter_mut().find(|(t, _)| t.id() == id) else {
            return Err(err(T::missing(id)));
        };
        if *used {
            return Err(err(T::in_use(id)));
        }
        *used = true;
        Ok(item.clone())
    }

    /// Says which device is resolved next (its `id=`).
    pub fn resolving(&mut self, id: Option<&str>) {
        self.resolving = id.map(str::to_owned);
    }

    /// The `id=` of the device being resolved.
    pub fn device_id(&self) -> Option<&str> {
        self.resolving.as_deref()
    }

    /// The next number in `kind`'s sequence: 0 for its first device.
    pub fn ordinal(&mut self, kind: &'static str) -> usize {
        let n = self.ordinals.entry(kind).or_default();
        *n += 1;
        *n - 1
    }

    /// Netdevs no NIC took.
    pub fn unused_netdevs(&self) -> impl Iterator<Item = &NetdevConfig> {
        self.netdevs.unused()
    }

    /// Chardevs nothing took: opened by themselves, as QEMU opens them.
    pub fn taken_chardevs(&self) -> Vec<String> {
        self.chardevs.items.iter().filter(|(_, used)| *used).map(|(c, _)| c.id.clone()).collect()
    }
}

impl Referable for DriveConfig {
    fn id(&self) -> &str {
        &self.id
    }
    fn missing(id: &str) -> String {
        format!("Property 'drive' can't find value '{id}'")
    }
    fn in_use(id: &str) -> String {
        format!("Drive '{id}' is already in use by another device")
    }
    fn pool(refs: &mut Refs) -> &mut Pool<Self> {
        &mut refs.drives
    }
}

impl Referable for NetdevConfig {
    fn id(&self) -> &str {
        NetdevConfig::id(self)
    }
    fn missing(id: &str) -> String {
        format!("Property 'netdev' can't find value '{id}'")
    }
    fn in_use(id: &str) -> String {
        format!("Property 'netdev' can't take value '{id}', it's in use")
    }
    fn pool(refs: &mut Refs) -> &mut Pool<Self> {
        &mut refs.netdevs
    }
}

impl Referable for FsdevConfig {
    fn id(&self) -> &str {
        &self.id
    }
    fn missing(id: &str) -> String {
        format!("fsdev with id {id} needs to be defined")
    }
    fn in_use(id: &str) -> String {
        format!("fsdev '{id}' is already used by another 9p device")
    }
    fn pool(refs: &mut Refs) -> &mut Pool<Self> {
        &mut refs.fsdevs
    }
}

impl Referable for ChardevConfig {
    fn id(&self) -> &str {
        &self.id
    }
    fn missing(id: &str) -> String {
        format!("Property 'chardev' can't find value '{id}'")
    }
    fn in_use(id: &str) -> String {
        format!("Property 'chardev' can't take value '{id}', it's in use")
    }
    fn pool(refs: &mut Refs) -> &mut Pool<Self> {
        &mut refs.chardevs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChardevBackend;

    #[test]
    fn a_reference_must_exist_and_be_free() {
        let chardevs = [
            ChardevConfig { id: "a".into(), backend: ChardevBackend::Null },
            ChardevConfig { id: "s".into(), backend: ChardevBackend::Null },
        ];
        let mut refs = Refs::new(&[], &[], &[], &chardevs, &["s"]);
        let a: Arc<ChardevConfig> = refs.take("-device x", "a").unwrap();
        assert_eq!(a.id, "a");
        let again = refs.take::<ChardevConfig>("-device y", "a").unwrap_err().to_string();
        assert_eq!(again, "-device y: Property 'chardev' can't take value 'a', it's in use");
        let serial = refs.take::<ChardevConfig>("-device y", "s").unwrap_err().to_string();
        assert!(serial.contains("in use"), "{serial}");
        let none = refs.take::<DriveConfig>("-device z", "d").unwrap_err().to_string();
        assert_eq!(none, "-device z: Property 'drive' can't find value 'd'");
        assert_eq!(refs.taken_chardevs(), ["a", "s"]);
        assert_eq!((refs.ordinal("net"), refs.ordinal("net"), refs.ordinal("blk")), (0, 1, 0));
    }
}
