//! Boot trace for people who benchmark: with `SKIFF_BOOT_TRACE=1` in the
//! environment, skiff prints on exit the time from its start to each boot
//! milestone, and a table of VM exits by kind and address with their count
//! and the time skiff spent handling them. A guest that polls a port for
//! seconds stands out at the top of the table.
//!
//! When the variable is unset, every hook is one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    VmReady,
    FirstVcpuEntry,
    FirstSerialByte,
    FirstPostPort,
    DebugExit,
    Exit,
}

const MILESTONES: [(Milestone, &str); 6] = [
    (Milestone::VmReady, "VM ready"),
    (Milestone::FirstVcpuEntry, "first vCPU entry"),
    (Milestone::FirstSerialByte, "first serial byte"),
    (Milestone::FirstPostPort, "first write to POST port 0x80"),
    (Milestone::DebugExit, "isa-debug-exit write"),
    (Milestone::Exit, "exit"),
];

/// Nanoseconds since start + 1 (0 = not reached), per milestone.
static REACHED: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
    Other,
}

/// (kind, address, claimed by a device) → (count, handling time).
type ExitTable = HashMap<(ExitKind, u64, bool), (u64, Duration)>;
static EXITS: Mutex<Option<ExitTable>> = Mutex::new(None);

/// (peak RSS, guest RAM resident) in KiB, taken as the VM stops.
static MEMORY: Mutex<Option<(u64, u64)>> = Mutex::new(None);

/// Records peak RSS and how much of guest RAM is resident, so the report can
/// tell the VMM's own memory (peak − guest RAM touched). `guest` are the
/// host address ranges of guest RAM.
pub fn record_memory(guest: &[(u64, u64)]) {
    if !enabled() {
        return;
    }
    let (status, smaps) = PROC_FILES.get().map_or((None, None), |(a, b)| (a.as_ref(), b.as_ref()));
    let status = read_proc(status);
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let smaps = read_proc(smaps);
    *MEMORY.lock().unwrap_or_else(|e| e.into_inner()) = Some((hwm, guest_rss_kib(&smaps, guest)));
}

/// Sums `Rss:` of the smaps mappings that lie inside one of `ranges`.
fn guest_rss_kib(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = ranges.iter().any(|&(s, l)| a >= s && b <= s + l);
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Reads `SKIFF_BOOT_TRACE` and starts the clock; call first thing in main.
pub fn init() {
    START.get_or_init(Instant::now);
    if std::env::var_os("SKIFF_BOOT_TRACE").is_some_and(|v| !v.is_empty() && v != "0") {
        ENABLED.store(true, Ordering::Relaxed);
        // Opened now: a sandbox forbids opening files later.
        let open = |p| std::fs::File::open(p).ok();
        let _ = PROC_FILES.set((open("/proc/self/status"), open("/proc/self/smaps")));
    }
}

/// /proc/self/status and smaps, read again from the start for each report.
static PROC_FILES: OnceLock<(Option<std::fs::File>, Option<std::fs::File>)> = OnceLock::new();

fn read_proc(file: Option<&std::fs::File>) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    if let Some(mut f) = file {
        if f.rewind().is_ok() {
            let _ = f.read_to_string(&mut text);
        }
    }
    text
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records the first time a milestone is reached.
pub fn milestone(m: Milestone) {
    if !enabled() {
        return;
    }
    let ns = START.get().map_or(0, |s| s.elapsed().as_nanos() as u64) + 1;
    let slot = &REACHED[MILESTONES.iter().position(|(x, _)| *x == m).unwrap_or(0)];
    let _ = slot.compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
}

/// Rows a vCPU's table keeps per address before folding unclaimed ones.
const MAX_ROWS: usize = 1024;

/// A vCPU's exit counts, kept thread-local and merged when the vCPU stops,
/// so counting costs no lock per exit.
#[derive(Default)]
pub struct VcpuExits {
    table: ExitTable,
}

impl VcpuExits {
    pub fn record(&mut self, kind: ExitKind, addr: u64, claimed: bool, took: Duration) {
        // A guest sweeping addresses must not grow the table without bound:
        // past the cap, new unclaimed addresses fold into one row per kind.
        let addr = if !claimed
            && self.table.len() >= MAX_ROWS
            && !self.table.contains_key(&(kind, addr, claimed))
        {
            u64::MAX
        } else {
            addr
        };
        let e = self.table.entry((kind, addr, claimed)).or_default();
        e.0 += 1;
        e.1 += took;
    }

    pub fn merge(self) {
        if self.table.is_empty() {
            return;
        }
        let mut all = EXITS.lock().unwrap_or_else(|e| e.into_inner());
        let all = all.get_or_insert_with(HashMap::new);
        for (k, (n, t)) in self.table {
            let e = all.entry(k).or_default();
            e.0 += n;
            e.1 += t;
        }
    }
}

fn fmt_ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

/// The report printed on exit (empty when tracing is off).
pub fn report() -> String {
    if !enabled() {
        return String::new();
    }
    milestone(Milestone::Exit);
    let mut out = String::from("skiff boot trace (time since skiff started)\n");
    for (i, (_, name)) in MILESTONES.iter().enumerate() {
        let v = REACHED[i].load(Ordering::Relaxed);
        let t = if v == 0 { "-".to_string() } else { fmt_ms(v - 1) };
        out += &format!("  {name:<32} {t:>12}\n");
    }
    if let Some((hwm, guest)) = *MEMORY.lock().unwrap_or_else(|e| e.into_inner()) {
        out += &format!(
            "memory: peak RSS {:.1} MiB, guest RAM touched {:.1} MiB, skiff's own {:.1} MiB\n",
            hwm as f64 / 1024.0,
            guest as f64 / 1024.0,
            hwm.saturating_sub(guest) as f64 / 1024.0
        );
    }
    let exits = EXITS.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
    let mut rows: Vec<_> = exits.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    let total: u64 = rows.iter().map(|r| r.1 .0).sum();
    out += &format!("VM exits handled by skiff: {total}\n");
    out += "  kind        address      device       count   handling time\n";
    for ((kind, addr, claimed), (n, t)) in rows {
        let kind = match kind {
            ExitKind::PioIn => "pio-in",
            ExitKind::PioOut => "pio-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Other => "other",
        };
        let dev = if claimed { "yes" } else { "unassigned" };
        out += &format!(
            "  {kind:<11} {addr:#010x}   {dev:<10} {n:>8}   {:>10}\n",
            fmt_ms(t.as_nanos() as u64)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rss_sums_only_guest_mappings() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 300 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                  50 kB
55d000000000-55d000001000 r-xp 00000000 08:01 1 /usr/bin/skiff
Rss:                   4 kB
";
        assert_eq!(guest_rss_kib(smaps, &[(0x7f00_0000_0000, 0x20_0000)]), 350);
        assert_eq!(guest_rss_kib(smaps, &[(0x7f00_0000_0000, 0x10_0000)]), 300);
    }

    #[test]
    fn report_lists_milestones_and_sorted_exits() {
        init();
        ENABLED.store(true, Ordering::Relaxed);
        milestone(Milestone::VmReady);
        let mut v = VcpuExits::default();
        for _ in 0..3 {
            v.record(ExitKind::PioIn, 0x71, false, Duration::from_micros(5));
        }
        v.record(ExitKind::PioOut, 0x3f8, true, Duration::from_micros(1));
        v.merge();
        let r = report();
        assert!(r.contains("VM ready"), "{r}");
        let rtc = r.find("0x00000071").unwrap();
        let com = r.find("0x000003f8").unwrap();
        assert!(rtc < com, "most frequent first:\n{r}");
        assert!(r.contains("unassigned"));
        assert!(r.contains("VM exits handled by skiff: 4"));
    }
}
