//! QEMU key codes ("qcodes", as `input-send-event` names keys) to PS/2 scan
//! codes. Set 1 is what a Linux guest sees with the i8042's default
//! translation on; set 2 is for a guest that turns translation off.

/// (qcode, set-1 code, set-2 code, extended: E0-prefixed in both sets)
const KEYS: &[(&str, u8, u8, bool)] = &[
    ("esc", 0x01, 0x76, false),
    ("1", 0x02, 0x16, false),
    ("2", 0x03, 0x1e, false),
    ("3", 0x04, 0x26, false),
    ("4", 0x05, 0x25, false),
    ("5", 0x06, 0x2e, false),
    ("6", 0x07, 0x36, false),
    ("7", 0x08, 0x3d, false),
    ("8", 0x09, 0x3e, false),
    ("9", 0x0a, 0x46, false),
    ("0", 0x0b, 0x45, false),
    ("minus", 0x0c, 0x4e, false),
    ("equal", 0x0d, 0x55, false),
    ("backspace", 0x0e, 0x66, false),
    ("tab", 0x0f, 0x0d, false),
    ("q", 0x10, 0x15, false),
    ("w", 0x11, 0x1d, false),
    ("e", 0x12, 0x24, false),
    ("r", 0x13, 0x2d, false),
    ("t", 0x14, 0x2c, false),
    ("y", 0x15, 0x35, false),
    ("u", 0x16, 0x3c, false),
    ("i", 0x17, 0x43, false),
    ("o", 0x18, 0x44, false),
    ("p", 0x19, 0x4d, false),
    ("bracket_left", 0x1a, 0x54, false),
    ("bracket_right", 0x1b, 0x5b, false),
    ("ret", 0x1c, 0x5a, false),
    ("ctrl", 0x1d, 0x14, false),
    ("a", 0x1e, 0x1c, false),
    ("s", 0x1f, 0x1b, false),
    ("d", 0x20, 0x23, false),
    ("f", 0x21, 0x2b, false),
    ("g", 0x22, 0x34, false),
    ("h", 0x23, 0x33, false),
    ("j", 0x24, 0x3b, false),
    ("k", 0x25, 0x42, false),
    ("l", 0x26, 0x4b, false),
    ("semicolon", 0x27, 0x4c, false),
    ("apostrophe", 0x28, 0x52, false),
    ("grave_accent", 0x29, 0x0e, false),
    ("shift", 0x2a, 0x12, false),
    ("backslash", 0x2b, 0x5d, false),
    ("z", 0x2c, 0x1a, false),
    ("x", 0x2d, 0x22, false),
    ("c", 0x2e, 0x21, false),
    ("v", 0x2f, 0x2a, false),
    ("b", 0x30, 0x32, false),
    ("n", 0x31, 0x31, false),
    ("m", 0x32, 0x3a, false),
    ("comma", 0x33, 0x41, false),
    ("dot", 0x34, 0x49, false),
    ("slash", 0x35, 0x4a, false),
    ("shift_r", 0x36, 0x59, false),
    ("kp_multiply", 0x37, 0x7c, false),
    ("alt", 0x38, 0x11, false),
    ("spc", 0x39, 0x29, false),
    ("caps_lock", 0x3a, 0x58, false),
    ("f1", 0x3b, 0x05, false),
    ("f2", 0x3c, 0x06, false),
    ("f3", 0x3d, 0x04, false),
    ("f4", 0x3e, 0x0c, false),
    ("f5", 0x3f, 0x03, false),
    ("f6", 0x40, 0x0b, false),
    ("f7", 0x41, 0x83, false),
    ("f8", 0x42, 0x0a, false),
    ("f9", 0x43, 0x01, false),
    ("f10", 0x44, 0x09, false),
    ("f11", 0x57, 0x78, false),
    ("f12", 0x58, 0x07, false),
    ("ctrl_r", 0x1d, 0x14, true),
    ("alt_r", 0x38, 0x11, true),
    ("home", 0x47, 0x6c, true),
    ("up", 0x48, 0x75, true),
    ("pgup", 0x49, 0x7d, true),
    ("left", 0x4b, 0x6b, true),
    ("right", 0x4d, 0x74, true),
    ("end", 0x4f, 0x69, true),
    ("down", 0x50, 0x72, true),
    ("pgdn", 0x51, 0x7a, true),
    ("insert", 0x52, 0x70, true),
    ("delete", 0x53, 0x71, true),
    ("meta_l", 0x5b, 0x1f, true),
    ("meta_r", 0x5c, 0x27, true),
    ("menu", 0x5d, 0x2f, true),
];

/// The Linux input key code (`KEY_*`) of a key, as virtio-input sends it:
/// for the keys of the PC keyboard's main block, the set-1 code itself;
/// for the E0-prefixed ones, Linux's own numbers.
pub fn linux_code(qcode: &str) -> Option<u16> {
    let &(name, set1, _, extended) = KEYS.iter().find(|k| k.0 == qcode)?;
    if !extended {
        return Some(u16::from(set1));
    }
    Some(match name {
        "ctrl_r" => 97,
        "alt_r" => 100,
        "home" => 102,
        "up" => 103,
        "pgup" => 104,
        "left" => 105,
        "right" => 106,
        "end" => 107,
        "down" => 108,
        "pgdn" => 109,
        "insert" => 110,
        "delete" => 111,
        "meta_l" => 125,
        "meta_r" => 126,
        "menu" => 127,
        _ => return None,
    })
}

/// Every Linux key code a keyboard of these keys has.
pub fn linux_codes() -> Vec<u16> {
    KEYS.iter().filter_map(|k| linux_code(k.0)).collect()
}

/// The key of QEMU's key number ("qnum": the set-1 code, 0x80 added for
/// an E0-prefixed key), as HMP's `sendkey 0x0c` names keys.
pub fn from_number(n: u64) -> Option<&'static str> {
    let n = u8::try_from(n).ok()?;
    let (code, extended) = (n & 0x7f, n & 0x80 != 0);
    KEYS.iter().find(|k| k.1 == code && k.3 == extended).map(|k| k.0)
}

pub fn is_known(qcode: &str) -> bool {
    KEYS.iter().any(|k| k.0 == qcode)
}

/// The bytes a keyboard sends for a key going down or up, in scan code set
/// 1 (`translated`) or set 2.
pub fn scancode(qcode: &str, down: bool, translated: bool) -> Option<Vec<u8>> {
    let &(_, set1, set2, extended) = KEYS.iter().find(|k| k.0 == qcode)?;
    let mut out = Vec::with_capacity(3);
    if extended {
        out.push(0xe0);
    }
    if translated {
        out.push(if down { set1 } else { set1 | 0x80 });
    } else {
        if !down {
            out.push(0xf0);
        }
        out.push(set2);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_alt_delete_in_both_sets() {
        assert_eq!(scancode("ctrl", true, true), Some(vec![0x1d]));
        assert_eq!(scancode("alt", true, true), Some(vec![0x38]));
        assert_eq!(scancode("delete", true, true), Some(vec![0xe0, 0x53]));
        assert_eq!(scancode("delete", false, true), Some(vec![0xe0, 0xd3]));
        assert_eq!(scancode("delete", true, false), Some(vec![0xe0, 0x71]));
        assert_eq!(scancode("delete", false, false), Some(vec![0xe0, 0xf0, 0x71]));
        assert_eq!(scancode("a", false, false), Some(vec![0xf0, 0x1c]));
        assert_eq!(scancode("nope", true, true), None);
    }

    #[test]
    fn linux_codes_for_virtio_input() {
        assert_eq!(linux_code("esc"), Some(1));
        assert_eq!(linux_code("a"), Some(30));
        assert_eq!(linux_code("ctrl"), Some(29));
        assert_eq!(linux_code("alt"), Some(56));
        assert_eq!(linux_code("delete"), Some(111));
        assert_eq!(linux_code("ret"), Some(28));
        assert_eq!(linux_code("nope"), None);
        let all = linux_codes();
        assert_eq!(all.len(), KEYS.len(), "every key has a Linux code");
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn every_letter_and_digit_is_mapped_once() {
        for c in ('a'..='z').chain('0'..='9') {
            let name = c.to_string();
            assert_eq!(KEYS.iter().filter(|k| k.0 == name).count(), 1, "{name}");
        }
        let mut set1: Vec<_> = KEYS.iter().map(|k| (k.1, k.3)).collect();
        set1.sort();
        set1.dedup();
        assert_eq!(set1.len(), KEYS.len(), "set-1 codes are unique");
    }
}
