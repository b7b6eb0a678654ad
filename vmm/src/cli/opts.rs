//! QEMU's `QemuOpts` syntax: `[implied,]key=value,key=value,...`.
//!
//! This follows `util/qemu-option.c` (`opts_do_parse`, `get_opt_value`) and the
//! value parsers QEMU applies to option strings (`qapi_bool_parse`,
//! `qemu_strtosz`, `qemu_strtou64` with base 0), so that every argv QEMU accepts
//! for these options splits the same way here.

use std::path::PathBuf;

use super::CliError;
use crate::config::OnOffAuto;

/// One parsed option argument, e.g. the `microvm,acpi=off` of `-M microvm,acpi=off`.
///
/// Option parsers `take` the keys they know; `finish` then rejects whatever is
/// left, so that an unknown key is never silently ignored.
#[derive(Debug)]
pub(crate) struct QemuOpts {
    /// Names the option in errors, e.g. `-M` and later `-M microvm`.
    label: String,
    /// Key/value pairs in command-line order (a key may repeat: last wins).
    params: Vec<(String, String)>,
}

impl QemuOpts {
    /// Splits `arg`; `implied` names the key of a leading value without `=`
    /// (`type` for `-M`, `driver` for `-device`, ...).
    pub fn parse(label: impl Into<String>, arg: &str, implied: Option<&str>) -> Self {
        QemuOpts { label: label.into(), params: split(arg, implied) }
    }

    /// Key/value pairs the command line implies (a `-net nic`'s device).
    pub fn from_pairs(label: impl Into<String>, params: Vec<(String, String)>) -> Self {
        QemuOpts { label: label.into(), params }
    }

    /// Renames the option in later errors, once its type is known.
    pub fn relabel(&mut self, label: String) {
        self.label = label;
    }

    /// Removes `key` and returns its last value (QEMU: the last one wins).
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut last = None;
        self.params.retain_mut(|(k, v)| {
            if k == key {
                last = Some(std::mem::take(v));
                false
            } else {
                true
            }
        });
        last
    }

    /// Removes every `key` and returns their values in order (keys that
    /// may repeat, as `hostfwd=`).
    pub fn take_all(&mut self, key: &str) -> Vec<String> {
        let mut all = Vec::new();
        self.params.retain_mut(|(k, v)| {
            if k == key {
                all.push(std::mem::take(v));
                false
            } else {
                true
            }
        });
        all
    }

    /// Removes every one of `keys` and returns (key, value) in command-line
    /// order (keys whose order matters across each other).
    pub fn take_all_of(&mut self, keys: &[&str]) -> Vec<(String, String)> {
        let mut all = Vec::new();
        self.params.retain_mut(|(k, v)| {
            if keys.contains(&k.as_str()) {
                all.push((std::mem::take(k), std::mem::take(v)));
                false
            } else {
                true
            }
        });
        all
    }

    /// Whether `key` was given (without taking it).
    pub fn contains(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, CliError> {
        self.take_with(key, parse_bool, "on or off")
    }

    pub fn take_on_off_auto(&mut self, key: &str) -> Result<Option<OnOffAuto>, CliError> {
        self.take_with(key, parse_on_off_auto, "on, off or auto")
    }

    pub fn take_uint(&mut self, key: &str) -> Result<Option<u64>, CliError> {
        self.take_with(key, parse_uint, "a number")
    }

    /// A size with QEMU's suffixes (`512M`, `2G`, bytes without a suffix).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>, CliError> {
        self.take_with(key, parse_size, "a size such as 512M")
    }

    /// Takes `id=`, which QEMU requires to be well formed (`id_wellformed`).
    pub fn take_id(&mut self) -> Result<Option<String>, CliError> {
        self.take_with("id", |id| id_wellformed(id).then(|| id.to_owned()), ID_SYNTAX)
    }

    /// Takes a path, which must not be empty.
    pub fn take_path(&mut self, key: &str) -> Result<Option<PathBuf>, CliError> {
        self.take_with(key, |p| (!p.is_empty()).then(|| PathBuf::from(p)), "a path")
    }

    /// Takes `key` and parses it with `parse`, naming `expected` on failure.
    fn take_with<T>(
        &mut self,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
        expected: &'static str,
    ) -> Result<Option<T>, CliError> {
        let Some(value) = self.take(key) else {
            return Ok(None);
        };
        match parse(&value) {
            Some(parsed) => Ok(Some(parsed)),
            None => Err(self.invalid_value(key, value, expected)),
        }
    }

    /// Rejects the first key that no parser took.
    pub fn finish(self) -> Result<(), CliError> {
        match self.params.into_iter().next() {
            None => Ok(()),
            Some((key, _)) => Err(CliError::UnknownProperty { option: self.label, key }),
        }
    }

    /// `<label>: <reason>`.
    pub fn error(&self, reason: impl Into<String>) -> CliError {
        CliError::Invalid { option: self.label.clone(), reason: reason.into() }
    }

    pub fn invalid_value(&self, key: &str, value: String, expected: &'static str) -> CliError {
        CliError::InvalidValue { option: self.label.clone(), key: key.to_owned(), value, expected }
    }

    pub fn missing(&self, key: &str) -> CliError {
        CliError::MissingProperty { option: self.label.clone(), key: key.to_owned() }
    }
}

/// Splits a QemuOpts string into key/value pairs, as QEMU's `opts_do_parse`:
///
/// - `key=value`; in values `,,` is a literal comma;
/// - a first element without `=` is the value of the `implied` key;
/// - any other element without `=` is a flag: `key` means `key=on`, `nokey`
///   means `key=off` (QEMU's legacy `server,nowait`);
/// - a trailing comma ends the list.
pub(super) fn split(arg: &str, mut implied: Option<&str>) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut rest = arg;
    while !rest.is_empty() {
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (name, value);
        if let Some(after_eq) = rest[name_len..].strip_prefix('=') {
            name = rest[..name_len].to_owned();
            (value, rest) = read_value(after_eq);
        } else if let Some(key) = implied {
            name = key.to_owned();
            (value, rest) = read_value(rest);
        } else {
            let flag = &rest[..name_len];
            (name, value) = match flag.strip_prefix("no") {
                Some(key) => (key.to_owned(), "off".to_owned()),
                None => (flag.to_owned(), "on".to_owned()),
            };
            rest = &rest[name_len..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        implied = None;
        params.push((name, value));
    }
    params
}

/// Reads a value up to the first single comma; returns it (with `,,` turned
/// into `,`) and the text after that comma.
fn read_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    loop {
        let Some(comma) = rest.find(',') else {
            value.push_str(rest);
            return (value, "");
        };
        value.push_str(&rest[..comma]);
        let after = &rest[comma + 1..];
        match after.strip_prefix(',') {
            Some(escaped) => {
                value.push(',');
                rest = escaped;
            }
            None => return (value, after),
        }
    }
}

/// What `id_wellformed` accepts, for error messages.
pub(super) const ID_SYNTAX: &str = "a letter followed by letters, digits, '-', '.' or '_'";

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.` or `_`.
pub(super) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// QEMU's `qapi_bool_parse`.
pub(super) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QAPI's `OnOffAuto` enum: exactly `on`, `off` or `auto`.
pub(super) fn parse_on_off_auto(s: &str) -> Option<OnOffAuto> {
    match s {
        "on" => Some(OnOffAuto::On),
        "off" => Some(OnOffAuto::Off),
        "auto" => Some(OnOffAuto::Auto),
        _ => None,
    }
}

/// QEMU's `qemu_strtou64(s, NULL, 0, ...)`: decimal, `0x` hex or `0` octal.
pub(super) fn parse_uint(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (hex, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    // from_str_radix would also take a sign, which strtou64 callers reject.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// QEMU's `qemu_strtosz`: a byte count with an optional binary suffix
/// (`B`, `K`, `M`, `G`, `T`, `P`, `E`, either case), a decimal fraction
/// (`1.5G`, which needs a suffix other than `B`), or `0x` hex without suffix.
pub(super) fn parse_size(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int, rest) = s.split_at(int_len);
    if int.is_empty() {
        return None;
    }
    let (fraction, suffix) = match rest.strip_prefix('.') {
        Some(after_dot) => {
            let len = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
            (Some(&after_dot[..len]), &after_dot[len..])
        }
        None => (None, rest),
    };
    let multiplier: u64 = match suffix {
        "" | "B" | "b" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return None,
    };
    let whole = int.parse::<u64>().ok()?.checked_mul(multiplier)?;
    let Some(fraction) = fraction else {
        return Some(whole);
    };
    // A fraction needs a scale, as in QEMU ("1.5" and "1.5B" are errors).
    if multiplier == 1 {
        return None;
    }
    // floor(0.fraction * multiplier) in integers: 19 digits keep this within
    // u128 and below a byte of error (QEMU itself uses a double).
    let digits = &fraction[..fraction.len().min(19)];
    let numerator: u128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    let denominator = 10u128.pow(u32::try_from(digits.len()).ok()?);
    let extra = u64::try_from(numerator * u128::from(multiplier) / denominator).ok()?;
    whole.checked_add(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(arg: &str, implied: Option<&str>) -> Vec<(String, String)> {
        split(arg, implied)
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn split_key_values() {
        assert_eq!(pairs("a=1,b=2", None), kv(&[("a", "1"), ("b", "2")]));
        assert_eq!(pairs("", None), kv(&[]));
        assert_eq!(pairs("a=", None), kv(&[("a", "")]));
        assert_eq!(pairs("a=x=y", None), kv(&[("a", "x=y")]));
    }

    #[test]
    fn split_implied_key() {
        assert_eq!(
            pairs("microvm,acpi=on", Some("type")),
            kv(&[("type", "microvm"), ("acpi", "on")])
        );
        // Only the first element can be implied, and only without '='.
        assert_eq!(pairs("type=microvm", Some("type")), kv(&[("type", "microvm")]));
        assert_eq!(
            pairs("acpi=on,microvm", Some("type")),
            kv(&[("acpi", "on"), ("microvm", "on")])
        );
        assert_eq!(pairs("512M", Some("size")), kv(&[("size", "512M")]));
        // Without an implied key a leading bare word is a flag.
        assert_eq!(pairs("foo", None), kv(&[("foo", "on")]));
    }

    #[test]
    fn split_escaped_commas() {
        assert_eq!(pairs("path=a,,b,x=1", None), kv(&[("path", "a,b"), ("x", "1")]));
        assert_eq!(pairs("path=a,,,,b", None), kv(&[("path", "a,,b")]));
        assert_eq!(pairs("path=a,,", None), kv(&[("path", "a,")]));
        assert_eq!(
            pairs("my,,vm,debug-threads=on", Some("guest")),
            kv(&[("guest", "my,vm"), ("debug-threads", "on")])
        );
    }

    #[test]
    fn split_trailing_comma() {
        assert_eq!(
            pairs("user,id=x,hostfwd=tcp::2222-:22,", Some("type")),
            kv(&[("type", "user"), ("id", "x"), ("hostfwd", "tcp::2222-:22")])
        );
        assert_eq!(pairs("microvm,", Some("type")), kv(&[("type", "microvm")]));
        assert_eq!(pairs("a=1,", None), kv(&[("a", "1")]));
    }

    #[test]
    fn split_flags() {
        assert_eq!(
            pairs("socket,server,nowait", Some("backend")),
            kv(&[("backend", "socket"), ("server", "on"), ("wait", "off")])
        );
        assert_eq!(pairs("a=1,,,b", None), kv(&[("a", "1,"), ("b", "on")]));
    }

    #[test]
    fn split_odd_inputs() {
        assert_eq!(pairs(",", None), kv(&[("", "on")]));
        assert_eq!(pairs("=", None), kv(&[("", "")]));
        assert_eq!(pairs(",a=1", Some("type")), kv(&[("type", ""), ("a", "1")]));
        assert_eq!(pairs("é=ü,ß", None), kv(&[("é", "ü"), ("ß", "on")]));
    }

    #[test]
    fn take_last_wins_and_finish() {
        let mut opts = QemuOpts::parse("-x", "a=1,b=2,a=3", None);
        assert!(opts.contains("a"));
        assert_eq!(opts.take("a").as_deref(), Some("3"));
        assert!(!opts.contains("a"));
        assert_eq!(opts.take("a"), None);
        let err = opts.finish().unwrap_err().to_string();
        assert_eq!(err, "-x: unknown property 'b'");
    }

    #[test]
    fn take_typed_values() {
        let mut opts = QemuOpts::parse("-x", "b=yes,o=auto,n=0x10,bad=maybe", None);
        assert_eq!(opts.take_bool("b").unwrap(), Some(true));
        assert_eq!(opts.take_on_off_auto("o").unwrap(), Some(OnOffAuto::Auto));
        assert_eq!(opts.take_uint("n").unwrap(), Some(16));
        assert_eq!(opts.take_bool("missing").unwrap(), None);
        let err = opts.take_bool("bad").unwrap_err().to_string();
        assert_eq!(err, "-x: invalid value 'maybe' for 'bad' (expected on or off)");
        assert!(opts.finish().is_ok());
    }

    #[test]
    fn ids() {
        for id in ["a", "stdio", "serial0", "a-b.c_d", "Z9"] {
            assert!(id_wellformed(id), "{id}");
        }
        for id in ["", "0a", "-a", "_a", "a b", "a,b", "é"] {
            assert!(!id_wellformed(id), "{id}");
        }
        let mut opts = QemuOpts::parse("-x", "id=1x,path=", None);
        assert!(opts
            .take_id()
            .unwrap_err()
            .to_string()
            .starts_with("-x: invalid value '1x' for 'id'"));
        assert!(opts
            .take_path("path")
            .unwrap_err()
            .to_string()
            .starts_with("-x: invalid value '' for 'path'"));
    }

    #[test]
    fn bools() {
        for s in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(s), Some(true), "{s}");
        }
        for s in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(s), Some(false), "{s}");
        }
        for s in ["", "ON", "1", "0", "auto", "onn"] {
            assert_eq!(parse_bool(s), None, "{s}");
        }
    }

    #[test]
    fn on_off_auto() {
        assert_eq!(parse_on_off_auto("on"), Some(OnOffAuto::On));
        assert_eq!(parse_on_off_auto("off"), Some(OnOffAuto::Off));
        assert_eq!(parse_on_off_auto("auto"), Some(OnOffAuto::Auto));
        assert_eq!(parse_on_off_auto("yes"), None);
        assert_eq!(parse_on_off_auto(""), None);
    }

    #[test]
    fn uints() {
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("42"), Some(42));
        assert_eq!(parse_uint("0xf4"), Some(0xf4));
        assert_eq!(parse_uint("0XF4"), Some(0xf4));
        assert_eq!(parse_uint("010"), Some(8));
        assert_eq!(parse_uint("18446744073709551615"), Some(u64::MAX));
        for s in ["", "0x", "-1", "+1", " 1", "1 ", "08", "0xg", "1k", "18446744073709551616"] {
            assert_eq!(parse_uint(s), None, "{s}");
        }
    }

    #[test]
    fn sizes_with_every_suffix() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("512b"), Some(512));
        assert_eq!(parse_size("4K"), Some(4 << 10));
        assert_eq!(parse_size("4k"), Some(4 << 10));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("2t"), Some(2 << 40));
        assert_eq!(parse_size("1P"), Some(1 << 50));
        assert_eq!(parse_size("1E"), Some(1 << 60));
        assert_eq!(parse_size("15E"), Some(15 << 60));
        assert_eq!(parse_size("0x1000"), Some(0x1000));
    }

    #[test]
    fn sizes_with_fractions() {
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("0.5K"), Some(512));
        assert_eq!(parse_size("1.K"), Some(1024));
        assert_eq!(parse_size("1.0000000000000000000000001M"), Some(1 << 20));
        assert_eq!(parse_size("1.999999999999999999999999K"), Some(2047));
    }

    #[test]
    fn bad_sizes() {
        for s in [
            "",
            "M",
            "12X",
            "1KiB",
            "1MB",
            "1 M",
            " 1M",
            "-1M",
            "+1M",
            "1.5",
            "1.5B",
            "0x",
            "0x1K",
            "0x1.5",
            "1..5M",
            "16E",
            "18446744073709551616",
            "99999999999999999999T",
            "1e3",
        ] {
            assert_eq!(parse_size(s), None, "{s}");
        }
    }
}
