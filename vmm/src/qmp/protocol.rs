//! The QMP protocol as QEMU speaks it, without sockets or a VM: a session
//! turns each JSON value a client sends into the response line and,
//! possibly, a request for the VMM to carry out.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::ctl::keys;
pub use crate::ctl::KeyEvent;

/// What a command asks of the machine; the session has already answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// ACPI power button.
    Powerdown,
    Reset,
    Quit,
    /// Key events, in order, to the first keyboard.
    Keys(Vec<KeyEvent>),
    /// `balloon`'s target in bytes, as given (answered by the machine).
    Balloon(i64),
    /// `query-balloon` (answered by the machine).
    QueryBalloon,
    /// `set_link`: a NIC's cable (answered by the machine).
    SetLink {
        name: String,
        up: bool,
    },
}

impl Request {
    /// Whether the machine's answer is the response: the session leaves
    /// it to whoever carries the request out (`answer`).
    pub fn answered_by_machine(&self) -> bool {
        matches!(self, Request::Balloon(_) | Request::QueryBalloon | Request::SetLink { .. })
    }
}

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "query-version",
    "query-commands",
    "system_powerdown",
    "system_reset",
    "quit",
    "input-send-event",
    "balloon",
    "query-balloon",
    "set_link",
];

/// The QEMU version skiff's QMP reports: the one whose protocol it follows.
pub(crate) const QEMU_VERSION: (u32, u32, u32) = (10, 0, 0);

fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": { "major": major, "minor": minor, "micro": micro },
        "package": concat!("skiff ", env!("CARGO_PKG_VERSION")),
    })
}

/// The first line a client reads.
pub fn greeting() -> Value {
    json!({ "QMP": { "version": version(), "capabilities": [] } })
}

/// An asynchronous event, timestamped as QEMU does.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ev = Map::new();
    ev.insert("event".into(), name.into());
    if let Some(data) = data {
        ev.insert("data".into(), data);
    }
    ev.insert(
        "timestamp".into(),
        json!({ "seconds": now.as_secs(), "microseconds": now.subsec_micros() }),
    );
    Value::Object(ev)
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({ "error": { "class": class, "desc": desc.into() } })
}

/// The answer to one input: the response line and what the VMM must do.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub response: Value,
    pub request: Option<Request>,
}

impl Reply {
    fn only(response: Value) -> Self {
        Reply { response, request: None }
    }
}

/// Says when what a client sent may hold a whole JSON value, so that the
/// parser runs once per value and not once per read: scanning is
/// incremental (each byte once), and a 1 MiB value arriving 4 KiB at a
/// time is parsed once, not 256 times from its start.
#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes of the buffer already scanned.
    scanned: usize,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// A value may end within what was scanned.
    candidate: bool,
    /// How often the parser ran (for the test that it runs once a value).
    #[cfg(test)]
    parses: usize,
}

impl Framer {
    /// Scans what came since the last call; true once a value may end in
    /// `inbuf` (a bracket closing the outermost one, a top-level string
    /// ending, whitespace or a stray byte at the top level).
    fn scan(&mut self, inbuf: &[u8]) -> bool {
        for &b in &inbuf[self.scanned.min(inbuf.len())..] {
            self.scanned += 1;
            if self.in_string {
                match (self.escape, b) {
                    (true, _) => self.escape = false,
                    (false, b'\\') => self.escape = true,
                    (false, b'"') => {
                        self.in_string = false;
                        self.candidate |= self.depth == 0;
                    }
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.candidate |= self.depth == 0;
                }
                _ if self.depth == 0 => self.candidate = true,
                _ => {}
            }
        }
        self.candidate
    }

    /// The next complete value, as `take_input`, parsing only when one may
    /// be there.
    pub fn take(&mut self, inbuf: &mut Vec<u8>) -> Option<Result<Value, String>> {
        if !self.scan(inbuf) {
            return None;
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        let taken = take_input(inbuf);
        // What is left is scanned afresh: the value (or the bad line) went,
        // or, with nothing complete, a later byte may end it.
        let rescan = taken.is_some() || inbuf.is_empty();
        if rescan {
            *self = Framer {
                #[cfg(test)]
                parses: self.parses,
                ..Framer::default()
            };
        } else {
            self.candidate = false;
        }
        taken
    }
}

/// The next complete JSON value from what a client sent, taken out of
/// `inbuf`; a value that cannot parse is skipped to the end of its line (as
/// QEMU's parser resyncs) and returned as the error's text. None: nothing
/// complete yet (or only whitespace, which is dropped).
pub fn take_input(inbuf: &mut Vec<u8>) -> Option<Result<Value, String>> {
    let mut stream = serde_json::Deserializer::from_slice(inbuf).into_iter::<Value>();
    let parsed = stream.next();
    let consumed = stream.byte_offset();
    match parsed {
        None => {
            inbuf.clear();
            None
        }
        Some(Err(e)) if e.is_eof() => None,
        Some(Ok(v)) => {
            inbuf.drain(..consumed);
            Some(Ok(v))
        }
        Some(Err(e)) => {
            let start = inbuf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(inbuf.len());
            let end = inbuf[start..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(inbuf.len(), |p| start + p + 1);
            inbuf.drain(..end);
            Some(Err(e.to_string()))
        }
    }
}

/// One client's protocol state: before `qmp_capabilities` only that command
/// is accepted, as in QEMU.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// Handles one parsed JSON value (or the parse error's text).
    /// `running`: whether the guest runs; `devices`: the `id=`s of the
    /// machine's devices (what `device` arguments may name).
    pub fn handle(
        &mut self,
        input: Result<Value, String>,
        running: bool,
        devices: &[String],
    ) -> Reply {
        let value = match input {
            Ok(v) => v,
            Err(e) => return Reply::only(error("GenericError", format!("JSON parse error, {e}"))),
        };
        let Value::Object(mut obj) = value else {
            return Reply::only(error("GenericError", "QMP input must be a JSON object"));
        };
        let id = obj.remove("id");
        let mut reply = self.execute(&mut obj, running, devices);
        if let (Some(id), Value::Object(resp)) = (id, &mut reply.response) {
            resp.insert("id".into(), id);
        }
        reply
    }

    fn execute(
        &mut self,
        obj: &mut Map<String, Value>,
        running: bool,
        devices: &[String],
    ) -> Reply {
        let command = match obj.remove("execute") {
            Some(Value::String(c)) => c,
            Some(_) => {
                return Reply::only(error(
                    "GenericError",
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Reply::only(error("GenericError", "QMP input lacks member 'execute'")),
        };
        if let Some(key) = obj.keys().find(|k| *k != "arguments") {
            return Reply::only(error(
                "GenericError",
                format!("QMP input member '{key}' is unexpected"),
            ));
        }
        let args = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(a)) => a,
            Some(_) => {
                return Reply::only(error(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };

        if command == "qmp_capabilities" {
            if self.negotiated {
                return Reply::only(error(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            if let Err(e) = no_args(&args, &["enable"]) {
                return Reply::only(e);
            }
            self.negotiated = true;
            return Reply::only(json!({ "return": {} }));
        }
        if !self.negotiated {
            return Reply::only(error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if !COMMANDS.contains(&command.as_str()) {
            return Reply::only(error(
                "CommandNotFound",
                format!("The command {command} has not been found"),
            ));
        }
        if command == "input-send-event" {
            return match key_events(&args).and_then(|k| display(&args, devices).map(|()| k)) {
                Ok(keys) => {
                    Reply { response: json!({ "return": {} }), request: Some(Request::Keys(keys)) }
                }
                Err(e) => Reply::only(e),
            };
        }
        if command == "balloon" {
            let value = no_args(&args, &["value"]).and_then(|()| match args.get("value") {
                None => Err(error("GenericError", "Parameter 'value' is missing")),
                Some(v) => v.as_i64().ok_or_else(|| {
                    error("GenericError", "Invalid parameter type for 'value', expected: integer")
                }),
            });
            return match value {
                Ok(v) => Reply { response: json!({}), request: Some(Request::Balloon(v)) },
                Err(e) => Reply::only(e),
            };
        }
        if command == "set_link" {
            let parsed = no_args(&args, &["name", "up"]).and_then(|()| {
                let name = match args.get("name") {
                    None => return Err(error("GenericError", "Parameter 'name' is missing")),
                    Some(Value::String(n)) => n.clone(),
                    Some(_) => {
                        return Err(error(
                            "GenericError",
                            "Invalid parameter type for 'name', expected: string",
                        ))
                    }
                };
                let up = match args.get("up") {
                    None => return Err(error("GenericError", "Parameter 'up' is missing")),
                    Some(v) => v.as_bool().ok_or_else(|| {
                        error("GenericError", "Invalid parameter type for 'up', expected: boolean")
                    })?,
                };
                Ok(Request::SetLink { name, up })
            });
            return match parsed {
                Ok(r) => Reply { response: json!({}), request: Some(r) },
                Err(e) => Reply::only(e),
            };
        }
        if let Err(e) = no_args(&args, &[]) {
            return Reply::only(e);
        }
        if command == "query-balloon" {
            return Reply { response: json!({}), request: Some(Request::QueryBalloon) };
        }
        let ok = json!({ "return": {} });
        match command.as_str() {
            "query-status" => Reply::only(json!({ "return": {
                "status": if running { "running" } else { "shutdown" },
                "running": running,
                "singlestep": false,
            }})),
            "query-version" => Reply::only(json!({ "return": version() })),
            "query-commands" => {
                let list: Vec<Value> = COMMANDS.iter().map(|c| json!({ "name": c })).collect();
                Reply::only(json!({ "return": list }))
            }
            "system_powerdown" => Reply { response: ok, request: Some(Request::Powerdown) },
            "system_reset" => Reply { response: ok, request: Some(Request::Reset) },
            // "quit" is the only one left.
            _ => Reply { response: ok, request: Some(Request::Quit) },
        }
    }
}

impl Reply {
    /// The response to a request the machine answers
    /// (`Request::answered_by_machine`): its answer, or the error QEMU
    /// gives, with the command's `id`.
    pub fn answer(&self, result: Result<crate::ctl::Answer, crate::ctl::CtlError>) -> Value {
        use crate::ctl::{Answer, CtlError};
        let mut response = match result {
            Ok(Answer::Done | Answer::Message(_)) => json!({ "return": {} }),
            Ok(Answer::Balloon { actual }) => json!({ "return": { "actual": actual } }),
            Err(CtlError::NoDevice(desc)) => error("DeviceNotActive", desc),
            Err(CtlError::NotFound(desc)) => error("DeviceNotFound", desc),
            Err(CtlError::Failed(desc)) => error("GenericError", desc),
        };
        if let (Some(id), Value::Object(r)) = (self.response.get("id"), &mut response) {
            r.insert("id".into(), id.clone());
        }
        response
    }
}

fn no_args(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), Value> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(error("GenericError", format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// `input-send-event`'s `device` names the display (QEMU's console) whose
/// input gets the events; skiff has no display, so any name is refused as
/// QEMU refuses a device that is not one.
fn display(args: &Map<String, Value>, devices: &[String]) -> Result<(), Value> {
    let Some(device) = args.get("device") else { return Ok(()) };
    let Some(id) = device.as_str() else {
        return Err(error("GenericError", "Invalid parameter type for 'device', expected: string"));
    };
    let head = args.get("head").and_then(Value::as_u64).unwrap_or(0);
    if !devices.iter().any(|d| d == id) {
        return Err(error("DeviceNotFound", format!("Device '{id}' not found")));
    }
    Err(error("GenericError", format!("Device {id} (head {head}) is not bound to a QemuConsole")))
}

/// `input-send-event`'s `events`: key events by qcode. Everything is checked
/// before anything is sent, so a bad event sends none.
fn key_events(args: &Map<String, Value>) -> Result<Vec<KeyEvent>, Value> {
    let invalid = |what: &str| error("GenericError", what.to_string());
    if let Some(k) = args.keys().find(|k| !["events", "device", "head"].contains(&k.as_str())) {
        return Err(invalid(&format!("Parameter '{k}' is unexpected")));
    }
    let events = args
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("Parameter 'events' is missing"))?;
    events
        .iter()
        .map(|ev| {
            if ev.get("type").and_then(Value::as_str) != Some("key") {
                return Err(invalid("only 'key' input events are supported"));
            }
            let data = ev.get("data").ok_or_else(|| invalid("Parameter 'data' is missing"))?;
            let down = data
                .get("down")
                .and_then(Value::as_bool)
                .ok_or_else(|| invalid("Parameter 'down' is missing"))?;
            let key = data.get("key").ok_or_else(|| invalid("Parameter 'key' is missing"))?;
            if key.get("type").and_then(Value::as_str) != Some("qcode") {
                return Err(invalid("only keys of type 'qcode' are supported"));
            }
            let qcode = key.get("data").and_then(Value::as_str).unwrap_or("");
            if !keys::is_known(qcode) {
                return Err(invalid(&format!("Parameter 'data' does not accept value '{qcode}'")));
            }
            Ok(KeyEvent { qcode: qcode.to_string(), down })
        })
        .collect()
}

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))]
pub(crate) mod tests {
    use super::*;

    /// Fuzz target: byte streams a client might send (commands, keys,
    /// broken JSON, random bytes, cut anywhere) through the decoder and the
    /// session. Every input comes out (nothing loops), every reply is a
    /// JSON object with `return` or `error`.
    #[cfg(test)]
    #[test]
    fn fuzz_qmp_protocol() {
        skiff_tests::fuzz::run("qmp-protocol", 20_000, fuzz_protocol);
    }

    /// One input of `fuzz_qmp_protocol` (also a libFuzzer target: `fuzz/`).
    pub(crate) fn fuzz_protocol(rng: &mut skiff_tests::fuzz::Rng) {
        use skiff_tests::fuzz::Rng;
        const PIECES: &[&str] = &[
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"query-status","id":1}"#,
            r#"{"execute":"query-commands"}"#,
            r#"{"execute":"query-version","arguments":{}}"#,
            r#"{"execute":"system_powerdown"}"#,
            r#"{"execute":"system_reset","arguments":{"x":1}}"#,
            r#"{"execute":"quit","id":{"a":[1,2]}}"#,
            r#"{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"ctrl"}}}]}}"#,
            r#"{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":1,"key":{"type":"number","data":-1}}}]}}"#,
            r#"{"execute":"input-send-event","arguments":{"events":"x"}}"#,
            r#"{"execute":"balloon","arguments":{"value":268435456}}"#,
            r#"{"execute":"balloon","arguments":{"value":-9223372036854775808}}"#,
            r#"{"execute":"query-balloon","id":2}"#,
            r#"{"execute":5}"#,
            r#"{"arguments":[]}"#,
            "[1,2,3]",
            "\"text\"",
            "{",
            "}",
            "{\"execute\":",
            "\"\\u",
            "\\",
            "\n",
            "\r\n",
            " ",
            "\u{0}",
            "1e999999",
            "-0",
            "null",
            "true",
            "{\"a\":{\"b\":{\"c\":[[[[[[[[[[]]]]]]]]]]}}}",
            "é",
        ];
        let stream = |rng: &mut Rng| -> Vec<u8> {
            let mut bytes = Vec::new();
            for _ in 0..rng.below(12) {
                if rng.one_in(5) {
                    bytes.extend(rng.bytes(32));
                } else {
                    bytes.extend_from_slice(rng.pick(PIECES).as_bytes());
                }
            }
            bytes
        };
        let bytes = stream(rng);
        let devices = ["kbd".to_owned()];
        let mut session = Session::default();
        let mut inbuf = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let chunk = 1 + rng.index(bytes.len() - at);
            inbuf.extend_from_slice(&bytes[at..at + chunk]);
            at += chunk;
            let mut rounds = 0;
            while let Some(input) = take_input(&mut inbuf) {
                rounds += 1;
                assert!(rounds <= bytes.len() + 1, "the decoder does not make progress");
                let reply = session.handle(input, rng.one_in(2), &devices);
                // What the machine answers is answered here as a machine
                // without the device would.
                let response = match &reply.request {
                    Some(r) if r.answered_by_machine() => {
                        reply.answer(Err(crate::ctl::CtlError::NoDevice("none")))
                    }
                    _ => reply.response.clone(),
                };
                let obj = response.as_object().expect("a reply is an object");
                assert!(obj.contains_key("return") || obj.contains_key("error"));
            }
        }
    }

    fn send(s: &mut Session, text: &str) -> Reply {
        s.handle(serde_json::from_str(text).map_err(|e| e.to_string()), true, &["kbd".into()])
    }

    fn class(r: &Reply) -> &str {
        r.response["error"]["class"].as_str().unwrap_or("")
    }

    /// `input-send-event`'s `device` names a display, which skiff has
    /// none of: an unknown id is DeviceNotFound, a known one is not bound
    /// to a console (QEMU's words); nothing is sent either way.
    #[test]
    fn keys_to_a_named_display_are_refused_as_qemu_refuses_them() {
        let mut s = Session::default();
        send(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let keys =
            r#""events":[{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"a"}}}]"#;
        let to = |device: &str| {
            format!(
                r#"{{"execute":"input-send-event","arguments":{{"device":"{device}",{keys}}}}}"#
            )
        };
        let r = send(&mut s, &to("nope"));
        assert_eq!((class(&r), r.request.is_none()), ("DeviceNotFound", true));
        assert_eq!(r.response["error"]["desc"], "Device 'nope' not found");
        let r = send(&mut s, &to("kbd"));
        assert_eq!((class(&r), r.request.is_none()), ("GenericError", true));
        assert_eq!(
            r.response["error"]["desc"],
            "Device kbd (head 0) is not bound to a QemuConsole"
        );
    }

    #[test]
    fn greeting_names_version_and_no_capabilities() {
        let g = greeting();
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 10);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
    }

    #[test]
    fn commands_wait_for_negotiation() {
        let mut s = Session::default();
        let r = send(&mut s, r#"{"execute":"query-status"}"#);
        assert_eq!(class(&r), "CommandNotFound");
        assert!(r.response["error"]["desc"].as_str().unwrap().contains("qmp_capabilities"));
        let r = send(&mut s, r#"{"execute":"qmp_capabilities","id":7}"#);
        assert_eq!(r.response, json!({"return": {}, "id": 7}));
        let r = send(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(class(&r), "CommandNotFound");
    }

    #[test]
    fn microvm_nix_shutdown_sequence() {
        let mut s = Session::default();
        assert_eq!(send(&mut s, r#"{"execute":"qmp_capabilities"}"#).request, None);
        let r = send(&mut s, r#"{"execute":"system_powerdown"}"#);
        assert_eq!(r.response, json!({"return": {}}));
        assert_eq!(r.request, Some(Request::Powerdown));
    }

    #[test]
    fn queries_and_control() {
        let mut s = Session { negotiated: true };
        let r = send(&mut s, r#"{"execute":"query-status"}"#);
        assert_eq!(r.response["return"]["status"], "running");
        assert_eq!(r.response["return"]["running"], true);
        let r = send(&mut s, r#"{"execute":"query-commands"}"#);
        let names: Vec<_> =
            r.response["return"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect();
        assert!(names.contains(&json!("system_powerdown")));
        assert_eq!(
            send(&mut s, r#"{"execute":"query-version"}"#).response["return"]["qemu"]["major"],
            10
        );
        assert_eq!(send(&mut s, r#"{"execute":"quit"}"#).request, Some(Request::Quit));
        assert_eq!(send(&mut s, r#"{"execute":"system_reset"}"#).request, Some(Request::Reset));
    }

    /// The framer hands the parser whole values, as the plain decoder
    /// would find them, whatever the reads' sizes; a 1 MiB value arriving
    /// 4 KiB at a time is parsed once (it was 256 times, from its start,
    /// ~1.4 s of CPU: issue 29, item 13).
    #[test]
    fn an_unfinished_message_is_not_parsed_again_on_every_read() {
        let text = format!(
            "{}\n{{\"execute\":\"query-status\",\"id\":\"a}}\\\"[\"}}  \"x\" [1,[2]]\n5\n\
             {{\"execute\":\"quit\"}}",
            r#"{"execute":"qmp_capabilities"}"#
        );
        let whole: Vec<_> = {
            let mut buf = text.clone().into_bytes();
            buf.push(b'\n');
            std::iter::from_fn(|| take_input(&mut buf)).collect()
        };
        for chunk in [1, 2, 3, 7, 64] {
            let (mut f, mut buf, mut got) = (Framer::default(), Vec::new(), Vec::new());
            for piece in text.as_bytes().chunks(chunk).chain([&b"\n"[..]]) {
                buf.extend_from_slice(piece);
                while let Some(v) = f.take(&mut buf) {
                    got.push(v);
                }
            }
            assert_eq!(got, whole, "chunks of {chunk}");
        }
        let mut big = b"[".to_vec();
        big.extend(std::iter::repeat_n(b"1,".as_slice(), 512 << 10).flatten());
        let (mut f, mut buf) = (Framer::default(), Vec::new());
        for piece in big.chunks(4096) {
            buf.extend_from_slice(piece);
            assert!(f.take(&mut buf).is_none());
        }
        buf.extend_from_slice(b"1]\n");
        assert!(
            matches!(f.take(&mut buf), Some(Ok(Value::Array(a))) if a.len() == (512 << 10) + 1)
        );
        assert_eq!(f.parses, 1, "parsed once, when it ended");
    }

    /// `balloon` and `query-balloon` are checked here and answered by the
    /// machine, with the command's id; bad arguments never reach it.
    #[test]
    fn balloon_commands_as_qemu_takes_them() {
        use crate::ctl::{Answer, CtlError};
        let mut s = Session { negotiated: true };
        let r = send(&mut s, r#"{"execute":"balloon","arguments":{"value":268435456},"id":3}"#);
        assert_eq!(r.request, Some(Request::Balloon(256 << 20)));
        assert_eq!(r.answer(Ok(Answer::Done)), json!({"return": {}, "id": 3}));
        let missing = r.answer(Err(CtlError::NoDevice("No balloon device has been activated")));
        assert_eq!(missing["error"]["class"], "DeviceNotActive");
        assert_eq!(missing["id"], 3);
        let r = send(&mut s, r#"{"execute":"query-balloon"}"#);
        assert_eq!(r.request, Some(Request::QueryBalloon));
        assert_eq!(r.answer(Ok(Answer::Balloon { actual: 5 })), json!({"return": {"actual": 5}}));
        for bad in [
            r#"{"execute":"balloon"}"#,
            r#"{"execute":"balloon","arguments":{"value":"1G"}}"#,
            r#"{"execute":"balloon","arguments":{"value":1.5}}"#,
            r#"{"execute":"balloon","arguments":{"value":1,"x":2}}"#,
            r#"{"execute":"query-balloon","arguments":{"x":2}}"#,
        ] {
            let r = send(&mut s, bad);
            assert_eq!((class(&r), r.request.is_none()), ("GenericError", true), "{bad}");
        }
        // Negative targets are the machine's to refuse (after it checked
        // there is a balloon, as QEMU's order is).
        let r = send(&mut s, r#"{"execute":"balloon","arguments":{"value":-1}}"#);
        assert_eq!(r.request, Some(Request::Balloon(-1)));
    }

    /// `set_link`'s arguments as QEMU checks them; the machine answers.
    #[test]
    fn set_link_as_qemu_takes_it() {
        let mut s = Session::default();
        send(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let r = send(&mut s, r#"{"execute":"set_link","arguments":{"name":"vlan1","up":false}}"#);
        assert_eq!(r.request, Some(Request::SetLink { name: "vlan1".into(), up: false }));
        assert!(r.request.as_ref().unwrap().answered_by_machine());
        for bad in [
            r#"{"execute":"set_link","arguments":{"up":true}}"#,
            r#"{"execute":"set_link","arguments":{"name":"x"}}"#,
            r#"{"execute":"set_link","arguments":{"name":"x","up":"yes"}}"#,
            r#"{"execute":"set_link","arguments":{"name":1,"up":true}}"#,
            r#"{"execute":"set_link","arguments":{"name":"x","up":true,"z":1}}"#,
        ] {
            let r = send(&mut s, bad);
            assert_eq!(class(&r), "GenericError", "{bad}");
            assert_eq!(r.request, None);
        }
        let missing = r.answer(Err(crate::ctl::CtlError::NotFound("Device 'x' not found".into())));
        assert_eq!(missing["error"]["class"], "DeviceNotFound");
    }

    #[test]
    fn errors_keep_the_session() {
        let mut s = Session { negotiated: true };
        let r = s.handle(Err("expected value at line 1 column 1".into()), true, &[]);
        assert_eq!(class(&r), "GenericError");
        assert_eq!(class(&send(&mut s, "[1,2]")), "GenericError");
        assert_eq!(class(&send(&mut s, r#"{"arguments":{}}"#)), "GenericError");
        assert_eq!(class(&send(&mut s, r#"{"execute":"frob","id":"x"}"#)), "CommandNotFound");
        assert_eq!(send(&mut s, r#"{"execute":"frob","id":"x"}"#).response["id"], "x");
        assert_eq!(
            class(&send(&mut s, r#"{"execute":"quit","arguments":{"now":1}}"#)),
            "GenericError"
        );
        assert_eq!(class(&send(&mut s, r#"{"execute":"quit","bogus":1}"#)), "GenericError");
        // Still fine afterwards.
        assert_eq!(
            send(&mut s, r#"{"execute":"query-status"}"#).response["return"]["running"],
            true
        );
    }

    #[test]
    fn input_send_event_ctrl_alt_delete() {
        let mut s = Session { negotiated: true };
        let r = send(
            &mut s,
            r#"{"execute":"input-send-event","arguments":{"events":[
                {"type":"key","data":{"down":true,"key":{"type":"qcode","data":"ctrl"}}},
                {"type":"key","data":{"down":true,"key":{"type":"qcode","data":"alt"}}},
                {"type":"key","data":{"down":true,"key":{"type":"qcode","data":"delete"}}}]}}"#,
        );
        assert_eq!(
            r.request,
            Some(Request::Keys(vec![
                KeyEvent { qcode: "ctrl".into(), down: true },
                KeyEvent { qcode: "alt".into(), down: true },
                KeyEvent { qcode: "delete".into(), down: true },
            ]))
        );
        let bad = send(
            &mut s,
            r#"{"execute":"input-send-event","arguments":{"events":[
                {"type":"key","data":{"down":true,"key":{"type":"qcode","data":"a"}}},
                {"type":"key","data":{"down":true,"key":{"type":"qcode","data":"nope"}}}]}}"#,
        );
        assert_eq!(class(&bad), "GenericError");
        assert_eq!(bad.request, None, "nothing is sent when one event is bad");
        let mouse = send(
            &mut s,
            r#"{"execute":"input-send-event","arguments":{"events":[{"type":"rel","data":{}}]}}"#,
        );
        assert_eq!(class(&mouse), "GenericError");
    }

    #[test]
    fn events_carry_data_and_timestamp() {
        let e = event("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
        assert_eq!(e["event"], "SHUTDOWN");
        assert_eq!(e["data"]["reason"], "guest-shutdown");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(event("POWERDOWN", None).get("data").is_none());
    }
}
