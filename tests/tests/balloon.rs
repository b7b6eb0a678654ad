//! virtio-balloon on real guests: microvm.nix's `microvm-balloon` exchange
//! (capabilities + `balloon` through socat, the last line a
//! `BALLOON_CHANGE`), inflation and deflation seen by the guest
//! (MemTotal), by QMP (`query-balloon`) and by the host (skiff's RSS, a
//! memfd's allocated blocks while virtiofsd maps it), free page reporting
//! with no QMP at all, and deflate-on-oom.
//!
//! All scenarios run in one test-host boot, like tests/boot.rs.

// Guest tests boot real kernels (a nested test host where the CPU has no
// vmx/svm): built only with `--features guest` (resources/test.sh does).
#![cfg(feature = "guest")]

use skiff_tests::{skiff_command, Batch, Scenario, ScenarioResult, QMP_FN, SHARE_FN, VIRTIOFSD_FN};

const SECS: u32 = 240;
const MIB: u64 = 1 << 20;

/// Host-side helpers (with `QMP_FN`'s `qmp`): query-balloon, skiff's RSS,
/// the memfd's blocks.
const HELPERS: &str = r#"
actual() {
	qmp '{"execute":"query-balloon"}' | sed -n 's/.*"return":{"actual":\([0-9]*\)}.*/\1/p' | tail -n 1
}
# Waits (up to $3 s) until query-balloon's actual is in [$1, $2]; prints it.
until_actual() {
	i=0
	while [ $i -lt $(($3 * 2)) ]; do
		a=$(actual)
		[ -n "$a" ] && [ "$a" -ge "$1" ] && [ "$a" -le "$2" ] && break
		sleep 0.5
		i=$((i + 1))
	done
	echo "$a"
}
# microvm.nix's microvm-balloon SIZE (MiB), exactly: its last line.
microvm_balloon() {
	printf '%s\n' '{"execute":"qmp_capabilities"}' \
		"{\"execute\":\"balloon\",\"arguments\":{\"value\":$(($1 * 1024 * 1024))}}" |
		socat STDIO UNIX:q.sock,shut-none | tail -n 1
}
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }
memfd_kb() {
	for f in /proc/$pid/fd/*; do
		case "$(readlink "$f")" in
		*memfd:memory-backend-memfd*)
			echo $(($(stat -L -c %b "$f") / 2))
			return
			;;
		esac
	done
	echo none
}
finish() {
	qmp '{"execute":"quit"}' >/dev/null
	wait $pid
	echo "SKIFF-RC=$?"
	echo "--- console"
	cat out.txt
}
"#;

fn start(pcie: bool, devices: &str, mode: &str) -> String {
    let cmd = skiff_command(
        pcie,
        &format!("-qmp unix:q.sock,server,nowait {devices}"),
        &format!("skiff.test=balloon skiff.balloon={mode}"),
    );
    format!(
        "{QMP_FN}{HELPERS}rm -f q.sock\n: > out.txt\n{cmd} > out.txt 2>&1 &\npid=$!\n\
         wait_for SKIFF-BALLOON-TOUCHED out.txt 150\n"
    )
}

/// Inflate to 256 MiB with microvm-balloon, measure, deflate to 512 MiB.
const INFLATE_DEFLATE: &str = r#"
wait_for SKIFF-BALLOON-MEM= out.txt 10
echo "RSS-FULL=$(rss)"
echo "MEMFD-FULL=$(memfd_kb)"
echo "QUERY-FULL=$(actual)"
echo "BALLOON-LAST=$(microvm_balloon 256)"
echo "QUERY-INFLATED=$(until_actual 0 $((260 << 20)) 90)"
sleep 1
echo "RSS-INFLATED=$(rss)"
echo "MEMFD-INFLATED=$(memfd_kb)"
echo "BALLOON-DEFLATE-LAST=$(microvm_balloon 512)"
echo "QUERY-DEFLATED=$(until_actual $((512 << 20)) $((512 << 20)) 90)"
sleep 1
"#;

fn scenarios() -> Vec<Scenario> {
    // microvm.nix's line without free page reporting (what the host gets
    // back is the balloon's alone) or deflate-on-oom (with it the driver
    // leaves MemTotal alone).
    let inflate = format!(
        "{}{INFLATE_DEFLATE}finish\n",
        start(true, "-device virtio-balloon-pci,id=balloon0", "fill")
    );
    // memfd RAM shared with a running virtiofsd, on virtio-mmio.
    let memfd_devices = "-object memory-backend-memfd,id=mem,size=512M,share=on \
         -chardev socket,id=fs0,path=fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=store \
         -device virtio-balloon-device,id=balloon0";
    let memfd = format!(
        "{SHARE_FN}{VIRTIOFSD_FN}share store; virtiofsd fs0 store\n{}{INFLATE_DEFLATE}finish\n",
        start(false, memfd_devices, "fill")
    );
    // microvm.nix's exact line; no QMP command at all.
    let report = format!(
        "{}sleep 1\necho \"RSS-HELD=$(rss)\"\nwait_for SKIFF-BALLOON-FREED out.txt 30\n\
         held=$(rss); i=0\n\
         while [ $i -lt 60 ] && [ $(($held - $(rss))) -lt 204800 ]; do sleep 0.5; i=$((i + 1)); done\n\
         echo \"RSS-REPORTED=$(rss)\"\nfinish\n",
        start(
            true,
            "-device virtio-balloon-pci,free-page-reporting=on,id=balloon0,deflate-on-oom=on",
            "report"
        )
    );
    // A guest reboot (QMP system_reset; no -no-reboot) empties the
    // balloon and clears its target: the new guest keeps all its RAM.
    let reboot = format!(
        "{}wait_for SKIFF-BALLOON-MEM= out.txt 10\n\
         echo \"BALLOON-LAST=$(microvm_balloon 256)\"\n\
         echo \"QUERY-INFLATED=$(until_actual 0 $((260 << 20)) 90)\"\n\
         qmp '{{\"execute\":\"system_reset\"}}' >/dev/null\n\
         i=0; while [ $i -lt 1500 ] && [ \"$(count_lines SKIFF-BALLOON-TOUCHED out.txt)\" -lt 2 ]; do sleep 0.1; i=$((i + 1)); done\n\
         echo REBOOTED-MARK; sleep 3\n\
         echo \"QUERY-AFTER-RESET=$(actual)\"\nfinish\n",
        start(true, "-device virtio-balloon-pci,id=balloon0", "fill").replace("-no-reboot ", "")
    );
    let oom = format!(
        "{}echo \"BALLOON-LAST=$(microvm_balloon 256)\"\n\
         wait_for SKIFF-BALLOON-OOM-DD out.txt 150\nsleep 1\n\
         echo \"QUERY-AFTER-OOM=$(actual)\"\nfinish\n",
        start(false, "-device virtio-balloon-device,id=balloon0,deflate-on-oom=on", "oom")
    );
    vec![
        Scenario::script("balloon-inflate", SECS, &inflate),
        Scenario::script("balloon-memfd", SECS, &memfd),
        Scenario::script("balloon-report", SECS, &report),
        Scenario::script("balloon-oom", SECS, &oom),
        Scenario::script("balloon-reboot", SECS, &reboot),
    ]
}

static BATCH: Batch = Batch::new();

fn result(name: &str) -> &'static ScenarioResult {
    BATCH.result(scenarios, name)
}

fn number(r: &ScenarioResult, key: &str) -> u64 {
    r.value(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no number for {key}\n{}", r.describe()))
}

/// What the guest printed as it changed, in order: (MemTotal in kB, 4 KiB
/// pages in its balloon).
fn guest_views(r: &ScenarioResult) -> Vec<(u64, u64)> {
    r.lines()
        .filter_map(|l| l.trim().strip_prefix("SKIFF-BALLOON-MEM="))
        .filter_map(|v| {
            let (total, pages) = v.trim().split_once(',')?;
            Some((total.parse().ok()?, pages.parse().ok()?))
        })
        .collect()
}

/// The flow both machines share: microvm-balloon's last line is a
/// BALLOON_CHANGE; query-balloon says 512 MiB, then 256, then 512 again;
/// the guest's MemTotal falls by about 256 MiB and comes back; skiff's
/// RSS falls by at least 200 MiB; skiff exits 0 on quit.
fn inflate_and_deflate(r: &ScenarioResult) {
    assert!(r.has_line("SKIFF-BALLOON-TOUCHED"), "the guest never got ready\n{}", r.describe());
    assert!(
        r.value("BALLOON-LAST").is_some_and(|l| l.contains(r#""event":"BALLOON_CHANGE""#)),
        "microvm-balloon's last line must be a BALLOON_CHANGE\n{}",
        r.describe()
    );
    assert_eq!(number(r, "QUERY-FULL"), 512 * MIB, "{}", r.describe());
    let inflated = number(r, "QUERY-INFLATED");
    assert!((256 * MIB..=260 * MIB).contains(&inflated), "{inflated}\n{}", r.describe());
    let (full, low) = (number(r, "RSS-FULL"), number(r, "RSS-INFLATED"));
    assert!(full >= low + 200 * 1024, "RSS {full} kB -> {low} kB\n{}", r.describe());
    let views = guest_views(r);
    let (first, min) = (views[0].0, views.iter().map(|v| v.0).min().unwrap());
    assert!(first - min >= 250 * 1024, "MemTotal {views:?}\n{}", r.describe());
    let most = views.iter().map(|v| v.1).max().unwrap();
    assert_eq!((views[0].1, most), (0, 65536), "balloon pages {views:?}\n{}", r.describe());
    assert_eq!(views.last(), Some(&(first, 0)), "all back after deflating\n{}", r.describe());
    assert!(r.value("BALLOON-DEFLATE-LAST").is_some_and(|l| l.contains("BALLOON_CHANGE")));
    assert_eq!(number(r, "QUERY-DEFLATED"), 512 * MIB, "{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

#[test]
fn microvm_balloon_inflates_and_deflates_a_pci_balloon() {
    let r = result("balloon-inflate");
    inflate_and_deflate(r);
    assert_eq!(r.value("MEMFD-FULL"), Some("none"), "anonymous RAM\n{}", r.describe());
}

/// With memfd RAM that virtiofsd maps too, inflated pages leave the
/// memfd itself.
#[test]
fn inflated_pages_leave_a_shared_memfd() {
    let r = result("balloon-memfd");
    inflate_and_deflate(r);
    let (full, low) = (number(r, "MEMFD-FULL"), number(r, "MEMFD-INFLATED"));
    assert!(full >= low + 200 * 1024, "memfd {full} kB -> {low} kB\n{}", r.describe());
    assert!(!r.contains("VIRTIOFSD-FAILED"), "{}", r.describe());
}

/// Free page reporting gives back what the guest frees, with no QMP.
#[test]
fn freed_guest_memory_is_reported_back() {
    let r = result("balloon-report");
    assert!(r.has_line("SKIFF-BALLOON-FREED"), "{}", r.describe());
    let (held, after) = (number(r, "RSS-HELD"), number(r, "RSS-REPORTED"));
    assert!(held >= after + 200 * 1024, "RSS {held} kB -> {after} kB\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// deflate-on-oom: a guest inflated to 256 MiB that needs 350 MiB takes
/// pages back from its balloon instead of failing.
#[test]
fn a_guest_under_pressure_deflates_on_oom() {
    let r = result("balloon-oom");
    assert!(r.value("BALLOON-LAST").is_some_and(|l| l.contains("BALLOON_CHANGE")));
    assert_eq!(r.value("SKIFF-BALLOON-OOM-DD"), Some("0"), "{}", r.describe());
    let after = number(r, "QUERY-AFTER-OOM");
    assert!(after >= 256 * MIB + 64 * MIB, "query-balloon {after}\n{}", r.describe());
    // The first is the inflated guest's; the last after dd took pages
    // back (MemTotal stays: with deflate-on-oom the driver never moves it).
    let views = guest_views(r);
    let (first, last) = (views.first().unwrap(), views.last().unwrap());
    assert!(first.1 >= 60000, "{views:?}\n{}", r.describe());
    assert!(last.1 + 16384 <= first.1, "balloon pages {views:?}\n{}", r.describe());
    assert_eq!(first.0, last.0, "{views:?}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}

/// A reboot gives the guest all its RAM back and forgets the target: the
/// second boot's balloon holds nothing and QMP says 512 MiB.
#[test]
fn a_reboot_empties_the_balloon() {
    let r = result("balloon-reboot");
    assert_eq!(number(r, "QUERY-INFLATED"), 256 * MIB, "{}", r.describe());
    let boots = r.output.matches("SKIFF-BALLOON-TOUCHED").count();
    assert_eq!(boots, 2, "the guest rebooted once\n{}", r.describe());
    assert_eq!(number(r, "QUERY-AFTER-RESET"), 512 * MIB, "{}", r.describe());
    // Each boot's views: the first ends inflated, the second never is.
    let second = r.output.rsplit("SKIFF-BALLOON-TOUCHED").next().unwrap();
    let views = guest_views(&ScenarioResult { output: second.to_string(), ..r.clone() });
    assert!(!views.is_empty() && views.iter().all(|v| v.1 == 0), "{views:?}\n{}", r.describe());
    assert_eq!(r.value("SKIFF-RC"), Some("0"), "{}", r.describe());
}
