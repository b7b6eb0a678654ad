//! `-object memory-backend-*` and `-numa node,memdev=`: guest RAM's host
//! backing, as QEMU defines it (backends/hostmem*.c, hw/core/numa.c).
//!
//! The order of `-object` and `-numa` does not matter (QEMU creates every
//! backend before it resolves the nodes; microvm.nix emits `-numa` first).
//! microvm has one memory node: several are refused, since skiff gives
//! the guest no SRAT to tell them apart (nor does QEMU's microvm).

use super::opts::QemuOpts;
use super::CliError;
use crate::config::{MemoryBackendConfig, RamBacking, RamConfig};

/// Properties every QEMU memory backend has that skiff does not implement:
/// named in the error rather than called unknown.
const UNSUPPORTED: &[&str] = &[
    "prealloc-threads",
    "prealloc-context",
    "host-nodes",
    "policy",
    "reserve",
    "x-use-canonical-path-for-ramblock-id",
];

/// `-object memory-backend-ram|memory-backend-memfd,id=ID,size=SIZE,...`.
pub(super) fn parse_object(label: &str, arg: &str) -> Result<MemoryBackendConfig, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("qom-type"));
    let ty = opts.take("qom-type").ok_or_else(|| opts.missing("qom-type"))?;
    let memfd = match ty.as_str() {
        "memory-backend-ram" => false,
        "memory-backend-memfd" => true,
        "memory-backend-file" => {
            return Err(opts.error(
                "memory-backend-file is not supported (use memory-backend-memfd, \
                 with hugetlb=on for huge pages)",
            ))
        }
        _ => return Err(opts.error(format!("object type '{ty}' is not supported"))),
    };
    opts.relabel(format!("{label} {ty}"));
    let id = opts.take_id()?.ok_or_else(|| opts.missing("id"))?;
    let size = opts.take_size("size")?.ok_or_else(|| opts.missing("size"))?;
    if size == 0 {
        return Err(opts.error(format!("property 'size' of {ty} doesn't take value '0'")));
    }
    // QEMU's defaults: memfd is shared, plain RAM is not.
    let share = opts.take_bool("share")?.unwrap_or(memfd);
    let merge = opts.take_bool("merge")?;
    let dump = opts.take_bool("dump")?.unwrap_or(true);
    if opts.take_bool("prealloc")? == Some(true) {
        return Err(opts.error("prealloc=on is not supported"));
    }
    let backing = if memfd {
        let seal = opts.take_bool("seal")?.unwrap_or(true);
        let hugetlb = opts.take_bool("hugetlb")?.unwrap_or(false);
        let page = opts.take_size("hugetlbsize")?;
        if page == Some(0) {
            return Err(opts.error(format!("Property '{ty}.hugetlbsize' doesn't take value '0'")));
        }
        if page.is_some_and(|p| !p.is_power_of_two()) {
            return Err(opts.error("Hugepage size must be a power of 2"));
        }
        RamBacking::Memfd { share, hugetlb: hugetlb.then(|| page.unwrap_or(0)), seal }
    } else if share {
        RamBacking::AnonymousShared
    } else {
        RamBacking::Anonymous
    };
    if let Some(key) = UNSUPPORTED.iter().find(|k| opts.contains(k)) {
        return Err(opts.error(format!("'{key}' is not supported")));
    }
    opts.finish()?;
    Ok(MemoryBackendConfig { id, size, ram: RamConfig { backing, merge, dump } })
}

/// `-numa node[,nodeid=0][,memdev=ID]`: the memory backend of the node.
pub(super) fn parse_numa(label: &str, arg: &str) -> Result<Option<String>, CliError> {
    let mut opts = QemuOpts::parse(label, arg, Some("type"));
    let ty = opts.take("type").ok_or_else(|| opts.missing("type"))?;
    if ty != "node" {
        return Err(opts.error(format!("'{ty}' is not supported (only -numa node)")));
    }
    opts.relabel(format!("{label} node"));
    if opts.contains("mem") {
        // QEMU's words for microvm, which has no numa_mem_supported.
        return Err(opts.error(
            "Parameter -numa node,mem is not supported by this machine type \
             (use -numa node,memdev instead)",
        ));
    }
    if let Some(id) = opts.take_uint("nodeid")? {
        if id != 0 {
            return Err(opts.error("only node 0 is supported (microvm has one memory node)"));
        }
    }
    if opts.contains("cpus") {
        return Err(opts.error("cpus= is not supported (every vCPU is in node 0)"));
    }
    let memdev = opts.take("memdev");
    opts.finish()?;
    Ok(memdev)
}

/// Guest RAM's backing once every option is in: the node's memdev, whose
/// size must be `-m`'s, with QEMU's message otherwise.
pub(super) fn resolve(
    backends: &[MemoryBackendConfig],
    node: Option<Option<String>>,
    mem_size: u64,
) -> Result<Option<&MemoryBackendConfig>, CliError> {
    let Some(memdev) = node else { return Ok(None) };
    let backend = match &memdev {
        Some(id) => {
            Some(backends.iter().find(|b| b.id == *id).ok_or_else(|| CliError::Invalid {
                option: format!("-numa node,memdev={id}"),
                reason: format!("memory backend '{id}' not found (no -object with id={id})"),
            })?)
        }
        None => None,
    };
    let total = backend.map_or(0, |b| b.size);
    if total != mem_size {
        return Err(CliError::Invalid {
            option: "-numa".to_owned(),
            reason: format!(
                "total memory for NUMA nodes ({total:#x}) should equal RAM size ({mem_size:#x})"
            ),
        });
    }
    Ok(backend)
}
