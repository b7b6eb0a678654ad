//! HMP command lines: parsed into what they ask, answered in QEMU's words.

use crate::ctl::KeyEvent;

/// What a command line asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// Nothing (an empty line): just the prompt again.
    Empty,
    /// Text to print, nothing to do (`help`, `info status`, an error).
    Say(String),
    /// `info status`: answered from the machine's state.
    Status,
    Quit,
    Reset,
    Powerdown,
    /// `sendkey`: the keys go down in order, and after `hold_ms` up in
    /// reverse order.
    SendKey {
        down: Vec<KeyEvent>,
        up: Vec<KeyEvent>,
        hold_ms: u64,
    },
    /// `set_link NAME on|off`.
    SetLink {
        name: String,
        up: bool,
    },
    /// `hostfwd_add [NETDEV] RULE` / `hostfwd_remove [NETDEV] RULE`: on
    /// the named user netdev, or the first.
    HostFwd {
        netdev: Option<String>,
        command: crate::ctl::Command,
    },
}

/// QEMU's default `sendkey` hold time.
const DEFAULT_HOLD_MS: u64 = 100;

const HELP: &str = "\
help|? [cmd] -- show the help
info status -- show the current VM status (running|paused)
info version -- show the version of QEMU
quit|q  -- quit the emulator
screendump filename -- save screen (no display: always an error)
sendkey keys [hold_ms] -- send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)
set_link name on|off -- change the link status of a network adapter
hostfwd_add [netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport -- redirect TCP or UDP connections from host to guest (requires -net user)
hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport -- remove host-to-guest TCP or UDP redirection
system_powerdown  -- send system power down event
system_reset  -- reset the system
";

/// Parses one command line.
pub fn parse(line: &str) -> Line {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else { return Line::Empty };
    let args: Vec<&str> = words.collect();
    match (cmd, args.as_slice()) {
        ("help" | "?", _) => Line::Say(HELP.to_owned()),
        ("quit" | "q", []) => Line::Quit,
        ("system_reset", []) => Line::Reset,
        ("system_powerdown", []) => Line::Powerdown,
        ("info", ["status"]) => Line::Status,
        ("info", ["version"]) => {
            let (a, b, c) = crate::qmp::QEMU_VERSION;
            Line::Say(format!("{a}.{b}.{c} (skiff {})\n", env!("CARGO_PKG_VERSION")))
        }
        ("info", []) => Line::Say(
            "info status -- show the current VM status\ninfo version -- show the version of QEMU\n"
                .to_owned(),
        ),
        ("info", [what, ..]) => Line::Say(format!("unknown command: 'info {what}'\n")),
        ("sendkey", [keys]) => sendkey(keys, None),
        ("sendkey", [keys, hold]) => match hold.parse::<u64>() {
            Ok(ms) => sendkey(keys, Some(ms)),
            Err(_) => Line::Say(format!("Error: invalid hold time '{hold}'\n")),
        },
        // No display: QEMU's words when there is no console to dump.
        ("screendump", [_, ..]) => {
            Line::Say("Error: There is no QemuConsole I can screendump from.\n".to_owned())
        }
        ("set_link", [name, state]) => match *state {
            "on" => Line::SetLink { name: (*name).to_owned(), up: true },
            "off" => Line::SetLink { name: (*name).to_owned(), up: false },
            _ => Line::Say(format!("Error: invalid parameter value: {state} (on or off)\n")),
        },
        ("hostfwd_add", [rule]) | ("hostfwd_add", [_, rule]) => {
            let netdev = (args.len() == 2).then(|| args[0].to_owned());
            match crate::cli::netdev::parse_hostfwd(rule) {
                Some(f) => Line::HostFwd { netdev, command: crate::ctl::Command::HostFwdAdd(f) },
                None => Line::Say("invalid host forwarding rule '".to_owned() + rule + "'\n"),
            }
        }
        ("hostfwd_remove", [rule]) | ("hostfwd_remove", [_, rule]) => {
            let netdev = (args.len() == 2).then(|| args[0].to_owned());
            match crate::cli::netdev::parse_hostfwd_host(rule) {
                Some((udp, addr, port)) => Line::HostFwd {
                    netdev,
                    command: crate::ctl::Command::HostFwdRemove { udp, addr, port },
                },
                None => Line::Say("invalid format\n".to_owned()),
            }
        }
        (
            "quit" | "q" | "system_reset" | "system_powerdown" | "sendkey" | "screendump"
            | "set_link",
            _,
        ) => Line::Say(format!("Error: wrong arguments for '{cmd}' (see 'help')\n")),
        _ => Line::Say(format!("unknown command: '{cmd}'\n")),
    }
}

/// `sendkey ctrl-alt-delete`: key names (QEMU's qcodes) or key numbers
/// (`0x0c`: QEMU's "qnum", the set-1 scan code, 0x80 set for an
/// E0-prefixed key) joined by `-`.
fn sendkey(keys: &str, hold_ms: Option<u64>) -> Line {
    let mut down = Vec::new();
    for name in keys.split('-') {
        let qcode = match name.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
            Some(Ok(n)) => crate::ctl::keys::from_number(n).map(str::to_owned),
            Some(Err(_)) => None,
            None => crate::ctl::keys::is_known(name).then(|| name.to_owned()),
        };
        match qcode {
            Some(qcode) => down.push(KeyEvent { qcode, down: true }),
            None => return Line::Say(format!("invalid parameter: {name}\n")),
        }
    }
    let up = down.iter().rev().map(|k| KeyEvent { qcode: k.qcode.clone(), down: false }).collect();
    Line::SendKey { down, up, hold_ms: hold_ms.unwrap_or(DEFAULT_HOLD_MS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(line: &str) -> (Vec<String>, u64) {
        match parse(line) {
            Line::SendKey { down, up, hold_ms } => {
                assert!(down.iter().all(|k| k.down) && up.iter().all(|k| !k.down));
                let names: Vec<String> = down.iter().map(|k| k.qcode.clone()).collect();
                let back: Vec<String> = up.iter().rev().map(|k| k.qcode.clone()).collect();
                assert_eq!(names, back, "released in reverse order");
                (names, hold_ms)
            }
            other => panic!("{line}: {other:?}"),
        }
    }

    /// The NixOS test driver's `send_key` forms.
    #[test]
    fn sendkey_as_the_test_driver_sends_it() {
        assert_eq!(
            keys("sendkey ctrl-alt-delete"),
            (vec!["ctrl".into(), "alt".into(), "delete".into()], 100)
        );
        assert_eq!(keys("sendkey shift-a").0, ["shift", "a"]);
        assert_eq!(keys("sendkey ret").0, ["ret"]);
        assert_eq!(keys("sendkey 0x0C").0, ["minus"]);
        assert_eq!(keys("sendkey 0xd3").0, ["delete"], "0x80: an E0 key");
        assert_eq!(keys("sendkey spc 500").1, 500);
        assert_eq!(parse("sendkey nosuchkey"), Line::Say("invalid parameter: nosuchkey\n".into()));
        assert_eq!(parse("sendkey 0xzz"), Line::Say("invalid parameter: 0xzz\n".into()));
    }

    #[test]
    fn commands_and_qemus_words() {
        assert_eq!(parse(""), Line::Empty);
        assert_eq!(parse("   "), Line::Empty);
        assert_eq!(parse("quit"), Line::Quit);
        assert_eq!(parse("q"), Line::Quit);
        assert_eq!(parse("system_reset"), Line::Reset);
        assert_eq!(parse("system_powerdown"), Line::Powerdown);
        assert_eq!(parse("info status"), Line::Status);
        assert_eq!(parse("frobnicate now"), Line::Say("unknown command: 'frobnicate'\n".into()));
        assert!(matches!(parse("screendump /tmp/x.ppm"), Line::Say(s) if s.contains("screendump")));
        assert!(matches!(parse("quit now"), Line::Say(s) if s.contains("wrong arguments")));
        assert!(matches!(parse("help"), Line::Say(s) if s.contains("sendkey")));
        assert_eq!(
            parse("set_link virtio-net-pci.1 off"),
            Line::SetLink { name: "virtio-net-pci.1".into(), up: false }
        );
        assert_eq!(parse("set_link vlan1 on"), Line::SetLink { name: "vlan1".into(), up: true });
        assert!(matches!(parse("set_link x maybe"), Line::Say(s) if s.contains("on or off")));
        assert!(matches!(parse("set_link x"), Line::Say(s) if s.contains("wrong arguments")));
        // The NixOS test driver's forward_port().
        match parse("hostfwd_add tcp::2222-:22") {
            Line::HostFwd { netdev: None, command: crate::ctl::Command::HostFwdAdd(f) } => {
                assert_eq!((f.host_port, f.guest_port, f.udp), (2222, 22, false));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("hostfwd_add user.0 udp:127.0.0.1:53-:53"),
            Line::HostFwd { netdev: Some(n), .. } if n == "user.0"
        ));
        assert!(matches!(
            parse("hostfwd_remove tcp::2222"),
            Line::HostFwd { command: crate::ctl::Command::HostFwdRemove { port: 2222, .. }, .. }
        ));
        assert!(matches!(parse("hostfwd_add nonsense"), Line::Say(s) if s.contains("invalid")));
        assert!(
            matches!(parse("hostfwd_remove x:y"), Line::Say(s) if s.contains("invalid format"))
        );
    }
}
