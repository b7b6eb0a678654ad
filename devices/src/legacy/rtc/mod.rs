//! MC146818 CMOS real-time clock and NVRAM at ports 0x70 (index) and 0x71
//! (data), IRQ 8.
//!
//! Time is the host's wall clock (UTC) plus whatever offset the guest sets.
//! The update-in-progress bit is set for the 244 µs before each second
//! boundary, as on the part, so a guest polling it waits at most that long.
//! Interrupt flags (periodic, alarm, update-ended) are computed from the
//! clock when looked at; the VMM calls `poll` when `next_event` says so and
//! re-reads `next_event` when the `rearm` eventfd fires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use acpi_tables::aml;

use crate::aml::{isa_device, isa_irq};
use crate::BusDevice;

mod timer;
pub use timer::RtcTimer;

const INDEX: u64 = 0;
const DATA: u64 = 1;

const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const DAY_OF_WEEK: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// The PC century byte (what QEMU's FADT names as the century register).
const CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;

/// UIP is high for this long before each update.
const UIP_WINDOW: Duration = Duration::from_micros(244);
const NS: i128 = 1_000_000_000;

pub type Clock = Box<dyn Fn() -> Duration + Send>;

fn system_clock() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

pub struct Rtc<T: Trigger> {
    irq: T,
    rearm: Option<EventFd>,
    clock: Clock,
    index: u8,
    cmos: [u8; 128],
    /// Guest time minus host time, in nanoseconds.
    offset_ns: i128,
    /// Guest time (ns) up to which interrupt flags have been computed.
    polled_ns: i128,
}

impl<T: Trigger> Rtc<T> {
    pub fn new(irq: T, rearm: Option<EventFd>) -> Self {
        Self::with_clock(irq, rearm, Box::new(system_clock))
    }

    pub fn with_clock(irq: T, rearm: Option<EventFd>, clock: Clock) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26; // 32.768 kHz divider, 1024 Hz rate select
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        let mut rtc = Rtc { irq, rearm, clock, index: 0, cmos, offset_ns: 0, polled_ns: 0 };
        rtc.polled_ns = rtc.now_ns();
        rtc
    }

    fn now_ns(&self) -> i128 {
        (self.clock)().as_nanos() as i128 + self.offset_ns
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    /// A time register as the guest reads it now.
    fn time_register(&self, reg: usize) -> u8 {
        if self.cmos[REG_B] & B_SET != 0 {
            // The guest is setting the clock: it reads back what it wrote.
            return self.cmos[reg];
        }
        let secs = self.now_ns().div_euclid(NS) as i64;
        let t = civil(secs);
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            DAY_OF_WEEK => self.encode(t.weekday),
            DAY_OF_MONTH => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            CENTURY => self.encode((t.year / 100) as u8),
            _ => self.cmos[reg],
        }
    }

    /// Takes the time the guest wrote while SET was held as the new time.
    fn commit_time(&mut self) {
        let year = i64::from(self.decode(self.cmos[CENTURY])) * 100
            + i64::from(self.decode(self.cmos[YEAR]));
        let t = CivilTime {
            year,
            month: self.decode(self.cmos[MONTH]).clamp(1, 12),
            day: self.decode(self.cmos[DAY_OF_MONTH]).clamp(1, 31),
            hour: self.decode_hour(self.cmos[HOURS]).min(23),
            minute: self.decode(self.cmos[MINUTES]).min(59),
            second: self.decode(self.cmos[SECONDS]).min(59),
            weekday: 0,
        };
        let host = (self.clock)().as_nanos() as i128;
        self.offset_ns = i128::from(unix_seconds(&t)) * NS - host;
        self.polled_ns = self.now_ns();
    }

    /// Snapshot of the running time into the registers, when SET is raised.
    fn freeze_time(&mut self) {
        for reg in [SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY] {
            self.cmos[reg] = self.time_register(reg);
        }
    }

    /// Periodic interrupt period, from rate select bits of register A.
    fn period_ns(&self) -> Option<i128> {
        let rs = u32::from(self.cmos[REG_A] & 0xf);
        let ticks: i128 = match rs {
            0 => return None,
            1 | 2 => 1 << (rs + 6),
            _ => 1 << (rs - 1),
        };
        Some(ticks * NS / 32768)
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = civil(secs);
        let check = |reg: usize, value: u8, hour: bool| {
            let a = self.cmos[reg];
            a & 0xc0 == 0xc0
                || if hour { self.decode_hour(a) == value } else { self.decode(a) == value }
        };
        check(SECONDS_ALARM, t.second, false)
            && check(MINUTES_ALARM, t.minute, false)
            && check(HOURS_ALARM, t.hour, true)
    }

    /// Brings register C up to date with the clock, raising IRQ 8 when an
    /// enabled flag becomes set.
    pub fn poll(&mut self) {
        if self.cmos[REG_B] & B_SET != 0 {
            return; // the clock does not run while being set
        }
        let now = self.now_ns();
        let last = self.polled_ns;
        if now <= last {
            return;
        }
        let mut flags = 0;
        if let Some(p) = self.period_ns() {
            if now.div_euclid(p) > last.div_euclid(p) {
                flags |= C_PF;
            }
        }
        let (s0, s1) = (last.div_euclid(NS) as i64, now.div_euclid(NS) as i64);
        if s1 > s0 {
            flags |= C_UF;
            // Each second that began in (last, now]; a day covers every alarm.
            if (s0 + 1..=s1).take(86_400).any(|s| self.alarm_matches(s)) {
                flags |= C_AF;
            }
        }
        self.polled_ns = now;
        self.cmos[REG_C] |= flags;
        // PIE/AIE/UIE in register B line up with PF/AF/UF in register C.
        let enabled = self.cmos[REG_B] & (B_PIE | B_AIE | B_UIE);
        if self.cmos[REG_C] & C_IRQF == 0 && self.cmos[REG_C] & enabled != 0 {
            self.cmos[REG_C] |= C_IRQF;
            if let Err(e) = self.irq.trigger() {
                crate::warn_limited!("rtc: cannot raise IRQ 8: {e:?}");
            }
        }
    }

    /// How long until `poll` may have something to raise; None when no
    /// interrupt is enabled or one is already pending.
    pub fn next_event(&self) -> Option<Duration> {
        let b = self.cmos[REG_B];
        if b & B_SET != 0 || self.cmos[REG_C] & C_IRQF != 0 {
            return None;
        }
        let now = self.now_ns();
        let until = |period: i128| period - now.rem_euclid(period);
        let mut next: Option<i128> = None;
        if b & (B_UIE | B_AIE) != 0 {
            next = Some(until(NS));
        }
        if b & B_PIE != 0 {
            if let Some(p) = self.period_ns() {
                next = Some(next.map_or(until(p), |n| n.min(until(p))));
            }
        }
        next.map(|ns| Duration::from_nanos(ns.max(1) as u64))
    }

    fn rearm(&self) {
        if let Some(evt) = &self.rearm {
            let _ = evt.write(1);
        }
    }

    fn read_data(&mut self) -> u8 {
        let reg = usize::from(self.index);
        match reg {
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                self.time_register(reg)
            }
            REG_A => {
                let sub = (self.clock)().as_nanos() as i128 + self.offset_ns;
                let into_second = Duration::from_nanos(sub.rem_euclid(NS) as u64);
                let updating = self.cmos[REG_B] & B_SET == 0
                    && into_second >= Duration::from_secs(1) - UIP_WINDOW;
                (self.cmos[REG_A] & !A_UIP) | if updating { A_UIP } else { 0 }
            }
            REG_C => {
                self.poll();
                let c = std::mem::take(&mut self.cmos[REG_C]);
                self.rearm();
                c
            }
            _ => self.cmos[reg],
        }
    }

    fn write_data(&mut self, value: u8) {
        let reg = usize::from(self.index);
        match reg {
            REG_A => self.cmos[REG_A] = value & !A_UIP,
            REG_B => {
                let old = self.cmos[REG_B];
                if value & B_SET != 0 && old & B_SET == 0 {
                    self.freeze_time();
                }
                self.cmos[REG_B] = value;
                if value & B_SET == 0 && old & B_SET != 0 {
                    self.commit_time();
                }
                if value & B_SET != 0 {
                    // Setting SET stops updates and clears UIE (datasheet).
                    self.cmos[REG_B] &= !B_UIE;
                }
                self.rearm();
            }
            REG_C | REG_D => {} // read-only
            SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                let running = self.cmos[REG_B] & B_SET == 0;
                if running {
                    self.freeze_time();
                }
                self.cmos[reg] = value;
                if running {
                    self.commit_time();
                }
            }
            _ => self.cmos[reg] = value,
        }
    }
}

impl<T: Trigger + Send> BusDevice for Rtc<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            // The index register is write-only on a PC; reads float high.
            INDEX => 0xff,
            DATA => self.read_data(),
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index masks NMI on a PC; the index has 7 bits.
            INDEX => self.index = v & 0x7f,
            DATA => self.write_data(v),
            _ => {}
        }
    }
}

struct CivilTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday, as the PC CMOS counts.
    weekday: u8,
}

/// Unix seconds → calendar (proleptic Gregorian, UTC); Howard Hinnant's
/// `civil_from_days`.
fn civil(secs: i64) -> CivilTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    CivilTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem % 3600 / 60) as u8,
        second: (rem % 60) as u8,
        // 1970-01-01 was a Thursday (5 in 1 = Sunday numbering).
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
    }
}

/// Calendar → Unix seconds; `days_from_civil`.
fn unix_seconds(t: &CivilTime) -> i64 {
    let y = t.year - i64::from(t.month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(t.month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(t.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second)
}

/// The CMOS RTC in the DSDT (PNP0B00) at `port`.
pub fn aml(port: u16, irq: u32) -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0B00");
    // Eight ports like physical hardware (and QEMU), even though only
    // 0x70/0x71 are decoded.
    isa_device("RTC_", &[("_HID", &hid)], vec![&aml::IO::new(port, port, 1, 8), &isa_irq(irq)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_utils::CountingTrigger;
    use std::sync::{Arc, Mutex};

    /// 2026-11-23 11:44:58 UTC, a Monday.
    const T0: u64 = 1_795_434_298;

    fn rtc_at(t: Arc<Mutex<Duration>>) -> Rtc<CountingTrigger> {
        Rtc::with_clock(CountingTrigger::default(), None, Box::new(move || *t.lock().unwrap()))
    }

    fn clock(secs: u64, nanos: u32) -> Arc<Mutex<Duration>> {
        Arc::new(Mutex::new(Duration::new(secs, nanos)))
    }

    fn rd(r: &mut Rtc<CountingTrigger>, reg: u8) -> u8 {
        r.write(INDEX, &[reg]);
        let mut b = [0u8];
        r.read(DATA, &mut b);
        b[0]
    }

    fn wr(r: &mut Rtc<CountingTrigger>, reg: u8, v: u8) {
        r.write(INDEX, &[reg | 0x80]); // NMI-mask bit is ignored
        r.write(DATA, &[v]);
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [0i64, 951_782_400, 1_709_164_800, T0 as i64, 4_102_444_800] {
            assert_eq!(unix_seconds(&civil(secs)), secs);
        }
        let t = civil(T0 as i64);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 23, 11, 44, 58)
        );
        assert_eq!(t.weekday, 2, "Monday");
    }

    #[test]
    fn reads_time_in_bcd_and_binary_and_12h() {
        let mut r = rtc_at(clock(T0, 0));
        assert_eq!(rd(&mut r, SECONDS as u8), 0x58);
        assert_eq!(rd(&mut r, MINUTES as u8), 0x44);
        assert_eq!(rd(&mut r, HOURS as u8), 0x11);
        assert_eq!(rd(&mut r, DAY_OF_MONTH as u8), 0x23);
        assert_eq!(rd(&mut r, MONTH as u8), 0x11);
        assert_eq!(rd(&mut r, YEAR as u8), 0x26);
        assert_eq!(rd(&mut r, CENTURY as u8), 0x20);
        wr(&mut r, REG_B as u8, B_24H | B_BINARY);
        assert_eq!(rd(&mut r, SECONDS as u8), 58);
        assert_eq!(rd(&mut r, YEAR as u8), 26);
        // 12-hour BCD: 23:xx reads 11 PM.
        let mut r = rtc_at(clock(T0 + 12 * 3600, 0));
        wr(&mut r, REG_B as u8, 0);
        assert_eq!(rd(&mut r, HOURS as u8), 0x80 | 0x11);
    }

    #[test]
    fn uip_is_brief_and_only_before_the_update() {
        let t = clock(T0, 0);
        let mut r = rtc_at(t.clone());
        assert_eq!(rd(&mut r, REG_A as u8) & A_UIP, 0);
        *t.lock().unwrap() = Duration::new(T0, 999_800_000);
        assert_eq!(rd(&mut r, REG_A as u8) & A_UIP, A_UIP);
        *t.lock().unwrap() = Duration::new(T0 + 1, 100);
        assert_eq!(rd(&mut r, REG_A as u8) & A_UIP, 0);
        assert_eq!(rd(&mut r, REG_D as u8), D_VRT);
    }

    #[test]
    fn guest_sets_the_time() {
        let t = clock(T0, 0);
        let mut r = rtc_at(t.clone());
        wr(&mut r, REG_B as u8, B_24H | B_SET);
        wr(&mut r, HOURS as u8, 0x01);
        wr(&mut r, MINUTES as u8, 0x02);
        wr(&mut r, SECONDS as u8, 0x03);
        assert_eq!(rd(&mut r, HOURS as u8), 0x01, "frozen while SET");
        wr(&mut r, REG_B as u8, B_24H);
        *t.lock().unwrap() = Duration::new(T0 + 10, 0);
        assert_eq!(rd(&mut r, SECONDS as u8), 0x13);
        assert_eq!(rd(&mut r, MINUTES as u8), 0x02);
        assert_eq!(rd(&mut r, HOURS as u8), 0x01);
        assert_eq!(rd(&mut r, DAY_OF_MONTH as u8), 0x23, "date unchanged");
    }

    #[test]
    fn nvram_keeps_bytes() {
        let mut r = rtc_at(clock(T0, 0));
        for reg in 0x0eu8..0x80 {
            if reg as usize != CENTURY {
                wr(&mut r, reg, reg ^ 0x5a);
            }
        }
        for reg in 0x0eu8..0x80 {
            if reg as usize != CENTURY {
                assert_eq!(rd(&mut r, reg), reg ^ 0x5a);
            }
        }
        wr(&mut r, REG_D as u8, 0);
        assert_eq!(rd(&mut r, REG_D as u8), D_VRT, "register D is read-only");
    }

    #[test]
    fn alarm_update_and_periodic_flags() {
        let t = clock(T0, 0);
        let mut r = rtc_at(t.clone());
        wr(&mut r, REG_A as u8, 0x20); // periodic rate off: PF stays clear
                                       // Alarm at 11:45:00, hour don't-care.
        wr(&mut r, SECONDS_ALARM as u8, 0x00);
        wr(&mut r, MINUTES_ALARM as u8, 0x45);
        wr(&mut r, HOURS_ALARM as u8, 0xc0); // don't care
        wr(&mut r, REG_B as u8, B_24H | B_AIE);
        assert_eq!(r.next_event(), Some(Duration::from_secs(1)));
        *t.lock().unwrap() = Duration::new(T0 + 1, 0); // 11:44:59: no alarm
        r.poll();
        assert_eq!(r.irq.0.get(), 0);
        assert_eq!(rd(&mut r, REG_C as u8), C_UF, "update flag without its enable");
        *t.lock().unwrap() = Duration::new(T0 + 2, 5); // 11:45:00
        r.poll();
        assert_eq!(r.irq.0.get(), 1);
        assert_eq!(r.next_event(), None, "pending until register C is read");
        assert_eq!(rd(&mut r, REG_C as u8), C_IRQF | C_AF | C_UF);
        assert_eq!(rd(&mut r, REG_C as u8), 0, "read clears");

        // Periodic at rate 15 (500 ms).
        wr(&mut r, REG_A as u8, 0x2f);
        wr(&mut r, REG_B as u8, B_24H | B_PIE);
        assert!(r.next_event().unwrap() <= Duration::from_millis(500));
        *t.lock().unwrap() = Duration::new(T0 + 2, 500_000_010);
        r.poll();
        assert_eq!(r.irq.0.get(), 2);
        assert_eq!(rd(&mut r, REG_C as u8), C_IRQF | C_PF);
        // Nothing enabled: nothing to wait for.
        wr(&mut r, REG_B as u8, B_24H);
        assert_eq!(r.next_event(), None);
    }
}
