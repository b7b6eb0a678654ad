//! Harness for Skiff's integration tests.
//!
//! A test describes [`Scenario`]s: shell commands that start a VMM (`$SKIFF`,
//! `$QEMU`, ...) on the test guest (`$BZIMAGE`, `$INITRD`). [`run_scenarios`]
//! runs a whole batch in one go through `tests/testhost/run-scenarios.sh`:
//! directly on a machine with hardware virtualization, or inside a throwaway
//! nested test host otherwise (booting one costs seconds, so batch them).
//! The guest's `/init` (resources/guest/init) prints markers such as
//! `SKIFF-INIT-OK` and `SKIFF-NPROC=2` on the serial console; assert on them
//! with [`ScenarioResult::has_line`] and [`ScenarioResult::value`].
//!
//! Environment: `SKIFF_BIN` (default `target/release/skiff`), `SKIFF_CACHE`
//! (assets, default `~/.cache/skiff`), `SKIFF_TEST_HOST=auto|l1|direct`,
//! `SKIFF_TEST_VERBOSE=1` (show the console live), `SKIFF_TEST_KERNEL` (a
//! different guest bzImage), `SKIFF_TEST_ONLY=NAME,...` (run only these
//! scenarios of a batch, while working on them: the others' tests fail).

pub mod fuzz;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

/// One command to run where KVM works.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Unique name, no whitespace.
    pub name: String,
    /// Time limit; the command's whole process group is killed after it.
    pub timeout_secs: u32,
    /// Shell command (run by `sh -c` in a fresh `$WORK` directory).
    pub command: String,
    /// Give the command a stdin that stays open (an idle pipe) instead of
    /// `/dev/null`.
    pub stdin_pipe: bool,
}

impl Scenario {
    pub fn new(name: impl Into<String>, timeout_secs: u32, command: impl Into<String>) -> Self {
        Scenario { name: name.into(), timeout_secs, command: command.into(), stdin_pipe: false }
    }

    /// A multi-line shell script as one scenario. The scenarios file holds
    /// one line per scenario, so the script travels base64-encoded and is
    /// sourced (it sees `$SKIFF`, `$BZIMAGE`, ... like a plain command).
    /// `SCRIPT_PRELUDE` is prepended: it defines `wait_for`.
    /// The names of the tools the script uses stay readable after it, as
    /// a comment: run-scenarios.sh takes along what the scenarios file
    /// mentions (QEMU, VIRTIOFSD, ...).
    pub fn script(name: impl Into<String>, timeout_secs: u32, script: &str) -> Self {
        let full = format!("{SCRIPT_PRELUDE}\n{script}");
        let mut command =
            format!("echo {} | base64 -d > script.sh && . ./script.sh", base64(&full));
        let tools: Vec<&str> = TOOLS.iter().copied().filter(|t| full.contains(t)).collect();
        if !tools.is_empty() {
            command.push_str(&format!(" # uses {}", tools.join(" ")));
        }
        Scenario::new(name, timeout_secs, command)
    }

    /// Same scenario with an open, idle stdin.
    pub fn with_stdin_pipe(mut self) -> Self {
        self.stdin_pipe = true;
        self
    }
}

/// What run-scenarios.sh brings into the test host when a scenario names it.
const TOOLS: &[&str] = &["$QEMU", "$VMLINUX", "$FIRECRACKER", "$CLOUD_HYPERVISOR", "$VIRTIOFSD"];

/// Shell helpers for `Scenario::script`: `wait_for MARKER FILE SECS` waits
/// until FILE has a line with MARKER (returns 1 on time-out);
/// `count_lines MARKER FILE` prints how many lines have MARKER (0 when FILE
/// does not exist yet: a backgrounded `cmd > FILE &` opens FILE in the
/// child, which may not have run when the script first looks). Both look
/// at whole lines only (`complete_lines`): the console writes a line a byte
/// at a time, and a test that acts on a marker must not cut off the value
/// after it (a SIGTERM sent between a checksum and its newline once did).
pub const SCRIPT_PRELUDE: &str = r#"
complete_lines() {
	n=$(wc -l 2>/dev/null < "$1")
	head -n "${n:-0}" "$1" 2>/dev/null
}
count_lines() {
	n=$(complete_lines "$2" | grep -c "$1")
	echo "${n:-0}"
}
wait_for() {
	i=0
	while [ "$i" -lt $(($3 * 10)) ]; do
		complete_lines "$2" | grep -q "$1" && return 0
		sleep 0.1
		i=$((i + 1))
	done
	echo "TIMED-OUT-WAITING-FOR $1"
	return 1
}
"#;

/// A `Scenario::script` body: `cmd` runs in the background (output in
/// `out.txt`, `$pid` is its process) until `marker` has been printed
/// `count` times (or `limit_secs` passed), then `between` runs (shell
/// lines), then SIGTERM; prints `SIGTERM-RC=` and the output.
pub fn until_then_sigterm(
    cmd: &str,
    marker: &str,
    count: u32,
    limit_secs: u32,
    between: &str,
) -> String {
    // out.txt exists before the child opens it: see `count_lines`.
    format!(
        ": > out.txt\n\
         {cmd} > out.txt 2>&1 &\n\
         pid=$!\n\
         i=0; while [ \"$(count_lines {marker} out.txt)\" -lt {count} ] && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done\n\
         {between}\n\
         kill -TERM $pid\n\
         wait $pid\n\
         echo \"SIGTERM-RC=$?\"\n\
         cat out.txt\n",
        ticks = limit_secs * 10,
    )
}

/// A console line cut where a kernel message begins in its middle: a
/// starved guest's kernel (a soft lockup report, "hrtimer: interrupt took")
/// writes its `[ seconds.micros]` lines into whatever init was printing,
/// and the value before it must not take the message's first bytes
/// (`SKIFF-9P-data-FILES=1000[   54.337597] watchdog: ...` was read as
/// "1000[").
fn split_printk(line: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(line);
    std::iter::from_fn(move || {
        let l = rest?;
        match l.match_indices('[').map(|(i, _)| i).find(|&i| i > 0 && printk_stamp(&l[i..])) {
            Some(at) => {
                rest = Some(&l[at..]);
                Some(&l[..at])
            }
            None => rest.take(),
        }
    })
}

/// Whether `s` starts with a kernel log timestamp: `[`, spaces, digits, a
/// dot, digits, `]`.
fn printk_stamp(s: &str) -> bool {
    let Some(s) = s.strip_prefix('[') else { return false };
    let s = s.trim_start_matches(' ');
    let int = s.bytes().take_while(u8::is_ascii_digit).count();
    let Some(s) = s[int..].strip_prefix('.') else { return false };
    let frac = s.bytes().take_while(u8::is_ascii_digit).count();
    int > 0 && frac > 0 && s[frac..].starts_with(']')
}

/// Whether the test host's own kernel reported a fault in one of its vCPU
/// threads (these lines come from the test host's console, not the guest's:
/// a guest's vCPU threads do not exist inside the guest).
fn test_host_oopsed(log: &str) -> bool {
    const MARKERS: [&str; 3] = [
        "BUG: TASK stack guard page was hit",
        "traps: PANIC: double fault",
        "BUG: scheduling while atomic: vcpu",
    ];
    log.lines().any(|l| MARKERS.iter().any(|m| l.contains(m)))
}

/// Standard base64 (RFC 4648, with padding), enough for shipping scripts.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What one scenario did.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    pub name: String,
    /// Exit status of the command (124 when it hit its time limit, 128+N
    /// when killed by signal N); `None` when the scenario never finished
    /// (the batch was cut short).
    pub rc: Option<i32>,
    /// stdout and stderr, `\r` removed.
    pub output: String,
    /// Wall time of the command in milliseconds, when known.
    pub millis: Option<u64>,
}

impl ScenarioResult {
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.output.lines().flat_map(split_printk)
    }

    /// Whether `marker` was printed as a line of its own. Kernel messages
    /// can land on the same console line, so a line that ends with the
    /// marker after a `]` or a space also counts.
    pub fn has_line(&self, marker: &str) -> bool {
        self.lines().any(|l| {
            let l = l.trim();
            l == marker
                || (l.ends_with(marker) && {
                    let before = &l[..l.len() - marker.len()];
                    before.ends_with(' ') || before.ends_with(']')
                })
        })
    }

    /// Whether the output contains `s` anywhere.
    pub fn contains(&self, s: &str) -> bool {
        self.output.contains(s)
    }

    /// The value printed as `KEY=VALUE` (first occurrence), e.g.
    /// `value("SKIFF-NPROC") == Some("2")`.
    pub fn value(&self, key: &str) -> Option<&str> {
        let pat = format!("{key}=");
        self.lines().find_map(|l| {
            let at = l.find(&pat)?;
            let rest = &l[at + pat.len()..];
            Some(rest.split_whitespace().next().unwrap_or(""))
        })
    }

    /// Everything after `KEY=` on the first line that has it, trimmed.
    pub fn line_value(&self, key: &str) -> Option<&str> {
        let pat = format!("{key}=");
        self.lines().find_map(|l| Some(l[l.find(&pat)? + pat.len()..].trim()))
    }

    /// A report for assertion messages: name, rc, the guest's error lines
    /// and the end of the output.
    pub fn describe(&self) -> String {
        const TAIL: usize = 60;
        let lines: Vec<&str> = self.output.lines().collect();
        let skip = lines.len().saturating_sub(TAIL);
        let mut s = format!(
            "scenario '{}': rc={} time={}\n--- output{} ---\n",
            self.name,
            self.rc.map_or("none (did not finish)".to_string(), |r| r.to_string()),
            self.millis.map_or("?".to_string(), |m| format!("{m} ms")),
            if skip > 0 {
                format!(" (last {TAIL} of {} lines)", lines.len())
            } else {
                String::new()
            }
        );
        // The first sign of trouble scrolls away behind a soft lockup's
        // repeated traces: keep the guest's own error lines from before.
        let alarms: Vec<&str> = lines[..skip]
            .iter()
            .copied()
            .filter(|l| ALARMS.iter().any(|a| l.contains(a)))
            .take(20)
            .collect();
        if !alarms.is_empty() {
            s.push_str("--- earlier error lines ---\n");
            for l in alarms {
                s.push_str(l);
                s.push('\n');
            }
            s.push_str("--- last lines ---\n");
        }
        for l in &lines[skip..] {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("--- end ---");
        s
    }
}

/// Words of a guest kernel's (or skiff's) error lines: a broken virtqueue
/// ("is not a head", "out of range"), a lockup, an oops, a device error.
const ALARMS: &[&str] = &[
    "is not a head",
    "out of range",
    "BUG:",
    "WARNING:",
    "Oops",
    "virtio",
    "skiff:",
    "timed out",
    "error",
];

/// Why a batch could not run.
#[derive(Debug)]
pub enum Error {
    /// The skiff binary is not there.
    SkiffMissing(PathBuf),
    /// A scenario is malformed.
    BadScenario(String),
    /// guest-assets.sh failed.
    Assets(String),
    /// run-scenarios.sh failed: test host did not boot, no /dev/kvm, ...
    TestHost {
        code: Option<i32>,
        log: PathBuf,
        message: String,
    },
    Io(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::SkiffMissing(p) => write!(
                f,
                "the skiff binary is missing at {}: build it with `cargo build --release -p vmm` \
                 (or point SKIFF_BIN at one)",
                p.display()
            ),
            Error::BadScenario(m) => write!(f, "bad scenario: {m}"),
            Error::Assets(m) => write!(f, "building the guest assets failed: {m}"),
            Error::TestHost { code, log, message } => write!(
                f,
                "the scenario batch could not run (run-scenarios.sh exit {}): {message}\nlog: {}",
                code.map_or("signal".to_string(), |c| c.to_string()),
                log.display()
            ),
            Error::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { repo_root().join(p) })
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The skiff binary the tests run: `$SKIFF_BIN`, or `target/release/skiff`.
pub fn skiff_bin() -> PathBuf {
    std::env::var_os("SKIFF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release").join("skiff"))
}

/// Newest modification time of the Rust sources of the VMM's crates.
fn newest_source() -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, newest);
            } else if p.extension().is_some_and(|x| x == "rs") || p.ends_with("Cargo.toml") {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if newest.map_or(true, |n| t > n) {
                        *newest = Some(t);
                    }
                }
            }
        }
    }
    let mut newest = None;
    for c in ["vmm", "boot", "devices", "pci"] {
        walk(&repo_root().join(c), &mut newest);
    }
    newest
}

/// Waits for `child` to exit, at most `secs` seconds; past that it is
/// killed and None comes back (a test then fails: skiff did not end).
pub fn exit_within(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Checks that the skiff binary exists (and warns when it looks older than
/// its sources).
pub fn check_skiff() -> Result<PathBuf, Error> {
    let bin = skiff_bin();
    let meta = fs::metadata(&bin).map_err(|_| Error::SkiffMissing(bin.clone()))?;
    if !meta.is_file() {
        return Err(Error::SkiffMissing(bin));
    }
    if std::env::var_os("SKIFF_BIN").is_none() {
        if let (Ok(built), Some(src)) = (meta.modified(), newest_source()) {
            if src > built {
                eprintln!(
                    "skiff-tests: warning: {} is older than the sources: rebuild with \
                     `cargo build --release -p vmm`",
                    bin.display()
                );
            }
        }
    }
    Ok(bin)
}

/// Builds (or checks) the guest assets, once per process.
pub fn ensure_assets() -> Result<(), Error> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = repo_root().join("resources/guest-assets.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--quiet")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
    .clone()
    .map_err(Error::Assets)
}

/// The results of one test file's batch, run once (one test-host boot) by
/// whichever test asks first; `cargo test` runs the file's tests as threads
/// of one process, so the others wait for it.
pub struct Batch {
    results: std::sync::OnceLock<Result<std::collections::HashMap<String, ScenarioResult>, String>>,
    nvme: bool,
}

impl Batch {
    pub const fn new() -> Self {
        Batch { results: std::sync::OnceLock::new(), nvme: false }
    }

    /// A batch whose test host has an IOMMU and an NVMe (`RunOptions::nvme`).
    pub const fn with_nvme() -> Self {
        Batch { results: std::sync::OnceLock::new(), nvme: true }
    }

    /// The result of scenario `name`, running `scenarios()` on first use.
    /// Panics (fails the calling test) when the batch could not run.
    pub fn result(&self, scenarios: fn() -> Vec<Scenario>, name: &str) -> &ScenarioResult {
        let results = self.results.get_or_init(|| {
            let mut all = scenarios();
            if let Some(only) = std::env::var("SKIFF_TEST_ONLY").ok().filter(|o| !o.is_empty()) {
                all.retain(|s| only.split(',').any(|n| n == s.name));
            }
            run_scenarios_with(&all, &RunOptions { nvme: self.nvme, ..RunOptions::default() })
                .map(|rs| rs.into_iter().map(|r| (r.name.clone(), r)).collect())
                .map_err(|e| e.to_string())
        });
        match results {
            Ok(m) => m.get(name).unwrap_or_else(|| panic!("no result for scenario {name}")),
            Err(e) => panic!("{e}"),
        }
    }
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

/// Options of [`run_scenarios_with`].
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Fail at once with [`Error::SkiffMissing`] when the skiff binary is
    /// missing (default). Off for batches that do not use `$SKIFF`.
    pub require_skiff: bool,
    /// Name of the log file under `target/skiff-tests/`.
    pub log_name: String,
    /// Scenarios that already ran once more after stalling on their own
    /// (see `rerun_stalled`): a second stall is their result.
    pub retried: std::collections::BTreeSet<String>,
    /// Give the test host an IOMMU and an NVMe controller on a fresh
    /// `nvme_image()` (starting with `NVME_PATTERN`), for VFIO.
    pub nvme: bool,
}

/// What the NVMe image of a VFIO batch starts with.
pub const NVME_PATTERN: &str = "SKIFF-NVME-PATTERN-0123456789";

/// The image behind the test host's NVMe controller (`RunOptions::nvme`);
/// read it after the batch to see what the guest wrote.
pub fn nvme_image() -> PathBuf {
    target_dir().join("skiff-tests/nvme.img")
}

impl Default for RunOptions {
    fn default() -> Self {
        // One log per test file (tests/boot.rs → boot.log): the binaries run
        // one after another and must not overwrite each other's logs.
        let log_name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem()?.to_str()?.split('-').next().map(str::to_owned))
            .unwrap_or_else(|| "scenarios".into());
        RunOptions { require_skiff: true, log_name, retried: Default::default(), nvme: false }
    }
}

/// Runs a batch of scenarios (one test-host boot) and returns their results
/// in order. A scenario missing from the results of an incomplete batch is
/// returned with `rc: None`.
pub fn run_scenarios(scenarios: &[Scenario]) -> Result<Vec<ScenarioResult>, Error> {
    run_scenarios_with(scenarios, &RunOptions::default())
}

pub fn run_scenarios_with(
    scenarios: &[Scenario],
    opts: &RunOptions,
) -> Result<Vec<ScenarioResult>, Error> {
    if opts.require_skiff {
        check_skiff()?;
    }
    let mut seen = std::collections::HashSet::new();
    for s in scenarios {
        if s.name.is_empty() || s.name.chars().any(|c| c.is_whitespace()) || s.name.starts_with('#')
        {
            return Err(Error::BadScenario(format!("bad name '{}'", s.name)));
        }
        if s.command.contains('\n') || s.command.contains('\t') {
            return Err(Error::BadScenario(format!("{}: command has a newline or tab", s.name)));
        }
        if !seen.insert(&s.name) {
            return Err(Error::BadScenario(format!("{}: duplicate name", s.name)));
        }
    }
    let asked = Instant::now();
    ensure_assets()?;
    let assets_secs = asked.elapsed().as_secs_f64();

    let dir = target_dir().join("skiff-tests");
    fs::create_dir_all(&dir)?;
    let scen_file = dir.join(format!("{}.tsv", opts.log_name));
    let log = dir.join(format!("{}.log", opts.log_name));
    let mut text = String::new();
    for s in scenarios {
        let pipe = if s.stdin_pipe { ":pipe" } else { "" };
        text.push_str(&format!("{}\t{}{}\t{}\n", s.name, s.timeout_secs, pipe, s.command));
    }
    fs::write(&scen_file, text)?;

    let script = repo_root().join("tests/testhost/run-scenarios.sh");
    let started = Instant::now();
    if opts.nvme {
        let f = fs::File::create(nvme_image())?;
        f.set_len(64 << 20)?;
        std::os::unix::fs::FileExt::write_all_at(&f, NVME_PATTERN.as_bytes(), 0)?;
    }
    let run = || {
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(&scen_file).arg(&log).env("SKIFF_BIN", skiff_bin());
        if opts.nvme {
            cmd.env("SKIFF_L1_NVME", nvme_image());
        }
        cmd.stdout(std::process::Stdio::inherit()).output()
    };
    let mut out = run()?;
    // The nested test host (TCG emulating SVM) itself occasionally never
    // comes up (exit 3), or its kernel oopses in the thread running skiff's
    // vCPU and a scenario stalls; that says nothing about skiff, so such a
    // batch runs once more. One that froze or ran out of time midway
    // (exit 5) keeps what finished: `rerun_stalled` runs the rest.
    if matches!(out.status.code(), Some(3)) || read_log(&log).is_ok_and(|l| test_host_oopsed(&l)) {
        print!("{}", String::from_utf8_lossy(&out.stderr));
        println!("skiff-tests: the test host failed; running batch '{}' again", opts.log_name);
        out = run()?;
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Progress lines, shown by cargo test only on failure or with --nocapture.
    print!("{stderr}");
    let took = started.elapsed().as_secs_f64();
    println!("skiff-tests: batch '{}' took {took:.1}s", opts.log_name);
    // Where a batch's time went, for resources/test.sh to show even when
    // every test passes (cargo test hides their output then).
    let done =
        stderr.lines().filter(|l| l.contains("done in") || l.contains("booting the test host"));
    let mut timing =
        fs::OpenOptions::new().create(true).append(true).open(dir.join("timing.txt"))?;
    writeln!(timing, "{}: assets {assets_secs:.1}s, batch {took:.1}s", opts.log_name)?;
    for l in done {
        writeln!(timing, "    {}", l.trim())?;
    }
    let code = out.status.code();
    // 0: ran to the end; 5: cut short (partial results are still useful).
    if code != Some(0) && code != Some(5) {
        let message =
            stderr.lines().rev().find(|l| l.contains("error:")).unwrap_or("no message").to_string();
        return Err(Error::TestHost { code, log, message });
    }
    let parsed = parse_log(&read_log(&log).map_err(Error::Io)?);
    let mut by_name: HashMap<String, ScenarioResult> =
        parsed.into_iter().map(|r| (r.name.clone(), r)).collect();
    rerun_stalled(scenarios, opts, &log, code == Some(5), &mut by_name)?;
    Ok(scenarios
        .iter()
        .map(|s| {
            by_name.remove(&s.name).unwrap_or_else(|| ScenarioResult {
                name: s.name.clone(),
                rc: None,
                output: format!("(scenario did not run or did not finish; see {})", log.display()),
                millis: None,
            })
        })
        .collect())
}

/// A vCPU triple-faulted (skiff's SKIFF_STALL_DUMP line) although the guest
/// neither asked for a restart (reboot=t prints "reboot: Restarting
/// system" first) nor panicked: the test host's corruption of guest state
/// (see `rerun_stalled`), seen a moment later. A panic's banner can be cut
/// in two by init's own output on the other vCPU (both write the UART),
/// so the crash the test triggered counts too.
fn unasked_reset(output: &str) -> bool {
    output.contains(" at triple fault: ")
        && !output.contains("reboot: Restarting system")
        && !output.contains("Kernel panic")
        && !output.contains("sysrq: Trigger a crash")
        && !output.contains("end Kernel panic")
}

/// A guest in the nested test host now and then stops making progress in
/// the middle of its boot (output ends mid-line of the kernel log, the
/// scenario hits its time limit) — seen at random points, more often when
/// the host is loaded, in no repeatable place; `SKIFF_STALL_DUMP` shows the
/// guest's registers replaced by the test host's own then. Such scenarios
/// (rc 124, or a reset the guest did not ask for: `unasked_reset`) run
/// once more in a fresh test host; the first attempt's log stays in
/// `<batch>.stalled.log` and every rerun is recorded in `stalled.txt` next
/// to it, so a hang that is skiff's (it would stall again) still fails.
/// When the test host itself froze or ran out of time (`cut_short`), the
/// scenarios that did not end, or never began, run there too; a test host
/// that froze again gets up to `FROZEN_RERUNS` fresh ones (a frozen test
/// host is never skiff's doing: a hang of skiff's ends at the scenario's
/// own limit inside it, rc 124). The one more run a scenario's own stall
/// earns is counted per scenario (`RunOptions::retried`), so one that
/// first ran in a rerun batch, after a freeze, gets it too.
fn rerun_stalled(
    scenarios: &[Scenario],
    opts: &RunOptions,
    log: &Path,
    cut_short: bool,
    by_name: &mut HashMap<String, ScenarioResult>,
) -> Result<(), Error> {
    let reruns = opts.log_name.matches(".rerun").count();
    if reruns > FROZEN_RERUNS {
        return Ok(());
    }
    let stalled_itself = |s: &Scenario| {
        by_name.get(&s.name).is_some_and(|r| r.rc == Some(124) || unasked_reset(&r.output))
            && !opts.retried.contains(&s.name)
    };
    let frozen_in = |s: &Scenario| {
        cut_short && reruns < FROZEN_RERUNS && by_name.get(&s.name).map_or(true, |r| r.rc.is_none())
    };
    let stalled: Vec<Scenario> =
        scenarios.iter().filter(|s| stalled_itself(s) || frozen_in(s)).cloned().collect();
    let mut retried = opts.retried.clone();
    retried.extend(scenarios.iter().filter(|s| stalled_itself(s)).map(|s| s.name.clone()));
    if stalled.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = stalled.iter().map(|s| s.name.as_str()).collect();
    let dir = log.parent().unwrap_or(Path::new("."));
    fs::copy(log, dir.join(format!("{}.stalled.log", opts.log_name)))?;
    let mut record =
        fs::OpenOptions::new().create(true).append(true).open(dir.join("stalled.txt"))?;
    for s in &stalled {
        let out = by_name.get(&s.name).map_or("(it never began)", |r| r.output.as_str());
        // The guest's last words, then skiff's SKIFF_STALL_DUMP lines.
        let last = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.starts_with("skiff:"))
            .unwrap_or("");
        writeln!(record, "{}: {} stalled after: {last}", opts.log_name, s.name)?;
        for l in
            out.lines().filter(|l| l.contains(" at stop: ") || l.contains(" at triple fault: "))
        {
            writeln!(record, "    {l}")?;
        }
    }
    println!("skiff-tests: {} did not finish; running them once more: {names:?}", opts.log_name);
    let rerun_opts =
        RunOptions { log_name: format!("{}.rerun", opts.log_name), retried, ..opts.clone() };
    for r in run_scenarios_with(&stalled, &rerun_opts)? {
        by_name.insert(r.name.clone(), r);
    }
    Ok(())
}

/// Fresh test hosts for scenarios whose test host froze.
const FROZEN_RERUNS: usize = 3;

/// A console log: bytes that are not UTF-8 (a guest's own, a command line
/// with Latin-1 in it) read as U+FFFD.
fn read_log(path: &Path) -> std::io::Result<String> {
    Ok(String::from_utf8_lossy(&fs::read(path)?).into_owned())
}

/// Parses a run-scenarios.sh log: `=== BEGIN NAME`, output lines,
/// `=== END NAME rc=N ms=T`. A scenario that began but never ended comes
/// back with `rc: None` and the output it printed.
pub fn parse_log(log: &str) -> Vec<ScenarioResult> {
    let log = log.replace('\r', "");
    let mut results = Vec::new();
    let mut cur: Option<(String, Vec<&str>)> = None;
    for line in log.lines() {
        if let Some(at) = line.find("=== BEGIN ") {
            if let Some((name, lines)) = cur.take() {
                results.push(ScenarioResult {
                    name,
                    rc: None,
                    output: lines.join("\n"),
                    millis: None,
                });
            }
            cur = Some((line[at + 10..].trim().to_string(), Vec::new()));
            continue;
        }
        if let Some(at) = line.find("=== END ") {
            let mut f = line[at + 8..].split_whitespace();
            let name = f.next().unwrap_or("").to_string();
            let mut rc = None;
            let mut millis = None;
            for kv in f {
                if let Some(v) = kv.strip_prefix("rc=") {
                    rc = v.parse().ok();
                } else if let Some(v) = kv.strip_prefix("ms=") {
                    millis = v.parse().ok();
                }
            }
            if let Some((cname, mut lines)) = cur.take() {
                if cname == name {
                    // The runner prints a newline before END.
                    if lines.last() == Some(&"") {
                        lines.pop();
                    }
                    let mut output = lines.join("\n");
                    if !output.is_empty() {
                        output.push('\n');
                    }
                    results.push(ScenarioResult { name, rc, output, millis });
                    continue;
                }
                results.push(ScenarioResult {
                    name: cname,
                    rc: None,
                    output: lines.join("\n"),
                    millis: None,
                });
            }
            continue;
        }
        if let Some((_, lines)) = cur.as_mut() {
            lines.push(line);
        }
    }
    if let Some((name, lines)) = cur.take() {
        results.push(ScenarioResult { name, rc: None, output: lines.join("\n"), millis: None });
    }
    results
}

/// Shell function `share DIR`: a share as the file-system tests use it,
/// DIR/data.bin (1 MiB of random bytes) and DIR/many/ (1,000 files).
/// Shell helpers: `virtiofsd NAME DIR` starts one on NAME.sock (log in
/// NAME.log) and waits for its socket (`share DIR`: `SHARE_FN`).
pub const VIRTIOFSD_FN: &str = r#"
virtiofsd() {
	rm -f "$1.sock"
	"$VIRTIOFSD" --socket-path="$PWD/$1.sock" --shared-dir="$PWD/$2" --cache=auto --sandbox=none >"$1.log" 2>&1 &
	j=0
	while [ ! -S "$1.sock" ] && [ $j -lt 100 ]; do sleep 0.1; j=$((j + 1)); done
	[ -S "$1.sock" ] || { echo "VIRTIOFSD-FAILED $1"; cat "$1.log"; }
}
expected() { echo "EXPECTED-$1=$(sha256sum "$2" | cut -d' ' -f1)"; }
"#;

/// Shell helper: `qmp CMD...` connects to `q.sock`, negotiates, sends each
/// command (a JSON line) and prints what comes back within a second.
pub const QMP_FN: &str = r#"
qmp() {
	{ echo '{"execute":"qmp_capabilities"}'; for c in "$@"; do echo "$c"; done; } | socat -t 1 STDIO UNIX:q.sock
}
"#;

/// Shell helper for VFIO scenarios (a test host with `SKIFF_L1_NVME`):
/// `vfio_bind` loads the VFIO modules, binds the test host's NVMe
/// controller to vfio-pci and unbinds the rest of its IOMMU group (the
/// serial port beside it) so the group is viable, printing
/// `VFIO-HOST=DDDD:BB:DD.F`, `VFIO-GROUP=N` and `VFIO-OTHERS=...` and
/// setting `$VFIO_HOST` and `$VFIO_OTHERS`; it fails with `VFIO-NO-NVME`.
pub const VFIO_FN: &str = r#"
vfio_bind() {
	while read -r m; do insmod "$L1_MODULES/$m" 2>/dev/null; done <"$L1_MODULES/order-vfio"
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/class")" = 0x010802 ] || continue
		VFIO_HOST=${d##*/}
		echo vfio-pci >"$d/driver_override"
		[ -e "$d/driver" ] && echo "$VFIO_HOST" >"$d/driver/unbind"
		echo "$VFIO_HOST" >/sys/bus/pci/drivers_probe
		VFIO_OTHERS=
		for o in "$d"/iommu_group/devices/*; do
			o=${o##*/}
			[ "$o" = "$VFIO_HOST" ] && continue
			VFIO_OTHERS="$VFIO_OTHERS $o"
			[ -e "/sys/bus/pci/devices/$o/driver" ] && echo "$o" >"/sys/bus/pci/devices/$o/driver/unbind"
		done
		echo "VFIO-HOST=$VFIO_HOST"
		echo "VFIO-GROUP=$(basename "$(readlink "$d/iommu_group")")"
		echo "VFIO-OTHERS=$VFIO_OTHERS"
		return 0
	done
	echo VFIO-NO-NVME
	return 1
}
"#;

pub const SHARE_FN: &str = r#"
share() {
	mkdir -p "$1/many"
	head -c 1048576 /dev/urandom >"$1/data.bin"
	i=1
	while [ $i -le 1000 ]; do echo $i >"$1/many/f$i"; i=$((i + 1)); done
}
"#;

/// microvm.nix's argv for a guest without devices (see
/// shared/MICROVM-NIX.md), with `$BZIMAGE`/`$INITRD` and the guest action:
/// `vmm` is `$SKIFF` or `$QEMU`, `machine_extra` is appended to the `-M`
/// keys (e.g. `acpi=on`), `extra` goes before `-append`.
pub fn microvm_nix_command(vmm: &str, acpi: bool, extra: &str, append_extra: &str) -> String {
    let acpi = if acpi { "on" } else { "off" };
    let mut cmd = format!(
        "{vmm} -name t -M microvm,accel=kvm:tcg,acpi={acpi},mem-merge=on,pcie=off,pic=off,pit=off,rtc=on,usb=off \
         -m 512M -smp 2 -nodefaults -no-user-config -no-reboot -kernel $BZIMAGE -initrd $INITRD \
         -chardev stdio,id=stdio,signal=off -serial chardev:stdio -enable-kvm -cpu host,+x2apic,-sgx \
         -device i8042 "
    );
    if !extra.is_empty() {
        cmd.push_str(extra);
        cmd.push(' ');
    }
    cmd.push_str(&format!(
        "-append \"earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 {append_extra}\" -nographic \
         -sandbox on"
    ));
    cmd
}

/// `microvm_nix_command` for `$SKIFF` with ACPI, on the PCIe root complex
/// (`pcie=on`) or on virtio-mmio (microvm.nix's `pcie=off`).
pub fn skiff_command(pcie: bool, devices: &str, append_extra: &str) -> String {
    let cmd = microvm_nix_command("$SKIFF", true, devices, append_extra);
    if pcie {
        cmd.replace("pcie=off", "pcie=on")
    } else {
        cmd
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    const LOG: &str = "SKIFF-L1-READY uptime=3.1\r\n=== BEGIN a\r\n[    1.0] x\r\nSKIFF-INIT-OK\r\nSKIFF-NPROC=2\r\n\r\n=== END a rc=0 ms=812\r\n=== BEGIN b\r\nno newline\r\n=== END b rc=124 ms=90000\r\n=== BEGIN c\r\npartial\r\n";

    #[test]
    fn unasked_resets_are_told_from_reboots_and_panics() {
        let dump =
            "skiff: vcpu0 at triple fault: 1572 exits, last PioIn 0x3fd, RIP=000000000000fff0";
        assert!(unasked_reset(&format!("[ 0.0] NX (Execute Disable) {dump}")));
        assert!(!unasked_reset(&format!("[ 6.4] reboot: Restarting system\n{dump}")));
        assert!(!unasked_reset(&format!("[ 4.7] Kernel panic - not syncing: sysrq\n{dump}")));
        // Seen in CI: the banner split by init's output on the other vCPU.
        let split = "[ 10.39] sysrq: Trigger a crash\n[ 10.428106] KeKIFF-UPTIME=10.rn11\nel panic";
        assert!(!unasked_reset(&format!("{split}\n{dump}")));
        assert!(!unasked_reset("[ 6.4] reboot: Power down"));
    }

    #[test]
    fn a_kernel_message_inside_a_line_ends_the_value_before_it() {
        let r = ScenarioResult {
            name: "t".into(),
            rc: Some(0),
            output: "SKIFF-9P-data-FILES=1000[   54.337597] watchdog: BUG: soft lockup\n\
                     SKIFF-VSOCK-REPLY=host-pong[   25.898910] hrtimer: interrupt took 1 ns\n\
                     [    1.000000] early SKIFF-DONE\nA=[x] B=[1.5 C=v[ 2.0]"
                .into(),
            millis: None,
        };
        assert_eq!(r.value("SKIFF-9P-data-FILES"), Some("1000"));
        assert_eq!(r.value("SKIFF-VSOCK-REPLY"), Some("host-pong"));
        assert!(r.lines().any(|l| l.starts_with("[   25.898910] hrtimer")), "kept as a line");
        assert!(r.has_line("SKIFF-DONE"), "a marker after a message still counts");
        assert_eq!(r.value("A"), Some("[x]"), "brackets that are not a timestamp stay");
        assert_eq!(r.value("B"), Some("[1.5"));
        assert_eq!(r.value("C"), Some("v"));
    }

    #[test]
    fn test_host_oops_is_recognised() {
        assert!(test_host_oopsed("[ 24.8] BUG: scheduling while atomic: vcpu0/125/0x00110001"));
        assert!(test_host_oopsed("x\n[ 173.9] BUG: TASK stack guard page was hit at 0000"));
        assert!(!test_host_oopsed("[ 4.7] Kernel panic - not syncing: sysrq triggered crash"));
    }

    #[test]
    fn scripts_say_which_tools_they_use() {
        let s = Scenario::script("x", 1, "\"$VIRTIOFSD\" --version; $SKIFF");
        assert!(s.command.ends_with("# uses $VIRTIOFSD"), "{}", s.command);
        let s = Scenario::script("x", 1, "$SKIFF");
        assert!(s.command.ends_with(". ./script.sh"), "{}", s.command);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(""), "");
        assert_eq!(base64("f"), "Zg==");
        assert_eq!(base64("fo"), "Zm8=");
        assert_eq!(base64("foo"), "Zm9v");
        assert_eq!(base64("foobar"), "Zm9vYmFy");
    }

    #[test]
    fn parses_log() {
        let r = parse_log(LOG);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].name, "a");
        assert_eq!(r[0].rc, Some(0));
        assert_eq!(r[0].millis, Some(812));
        assert!(r[0].has_line("SKIFF-INIT-OK"));
        assert_eq!(r[0].value("SKIFF-NPROC"), Some("2"));
        assert_eq!(r[0].output, "[    1.0] x\nSKIFF-INIT-OK\nSKIFF-NPROC=2\n");
        assert_eq!(r[1].rc, Some(124));
        assert_eq!(r[1].output, "no newline\n");
        assert_eq!(r[2].name, "c");
        assert_eq!(r[2].rc, None);
    }

    #[test]
    fn marker_after_kernel_message() {
        let r = ScenarioResult {
            name: "x".into(),
            rc: Some(0),
            output: "[    2.5] random: crng init doneSKIFF-INIT-OK\n[ 1.0] foo SKIFF-INIT-OK\n"
                .into(),
            millis: None,
        };
        assert!(r.has_line("SKIFF-INIT-OK"));
        assert!(!r.has_line("INIT-OK"));
    }

    #[test]
    fn command_has_microvm_nix_argv() {
        let c = microvm_nix_command("$SKIFF", true, "", "skiff.test=poweroff");
        assert!(c.starts_with("$SKIFF -name t -M microvm,accel=kvm:tcg,acpi=on,"));
        assert!(c.ends_with("panic=-1 skiff.test=poweroff\" -nographic -sandbox on"));
    }
}
