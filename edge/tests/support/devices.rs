//! Real device-side peers for the device tests: a Modbus TCP device
//! (pymodbus 3.16.1 in a venv under the target directory, running
//! `modbus_device.py`) and Debian's mosquitto clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PYMODBUS_VERSION: &str = "3.16.1";

/// Python with pymodbus, installed once per target directory.
pub fn pymodbus_python() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pymodbus-{PYMODBUS_VERSION}"));
        let py = venv.join("bin").join("python3");
        let marker = venv.join("installed");
        if marker.exists() {
            return py;
        }
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed to install pymodbus (apt-get install python3 python3-venv)");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(venv.join("bin").join("pip"))
            .args(["install", "-q", &format!("pymodbus=={PYMODBUS_VERSION}")])
            .status()
            .unwrap();
        assert!(ok.success(), "pip install pymodbus failed");
        std::fs::write(&marker, b"").unwrap();
        py
    })
    .clone()
}

/// `mosquitto_pub` / `mosquitto_sub` (Debian's mosquitto-clients; `./dev
/// test` installs them).
pub fn mosquitto(tool: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} is missing: run the tests with ./dev test, which installs mosquitto-clients");
}

/// Splits "127.0.0.1:1883" into host and port arguments.
fn host_port(addr: &str) -> (String, String) {
    let (h, p) = addr.rsplit_once(':').unwrap();
    (h.to_owned(), p.to_owned())
}

/// Publishes one message with mosquitto_pub (QoS 1: it returns once the
/// broker acknowledged).
pub fn mqtt_pub(addr: &str, topic: &str, payload: &str) {
    let (h, p) = host_port(addr);
    let o = Command::new(mosquitto("mosquitto_pub"))
        .args(["-h", &h, "-p", &p, "-q", "1", "-t", topic, "-m", payload])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Publishes every line of `lines` as one message with `mosquitto_pub -l`
/// at QoS 1: it returns once the broker acknowledged them all.
pub fn mqtt_pub_lines(addr: &str, topic: &str, lines: &str) {
    let (h, p) = host_port(addr);
    let mut child = Command::new(mosquitto("mosquitto_pub"))
        .args(["-h", &h, "-p", &p, "-q", "1", "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub -l failed");
}

/// A mosquitto_sub running in the background, printing `topic payload`
/// lines.
pub struct MqttSub {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl MqttSub {
    pub fn start(addr: &str, filter: &str) -> MqttSub {
        let (h, p) = host_port(addr);
        let mut child = Command::new(mosquitto("mosquitto_sub"))
            .args(["-h", &h, "-p", &p, "-v", "-t", filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        // Let it subscribe before anything is published.
        std::thread::sleep(Duration::from_millis(500));
        MqttSub { child, lines }
    }

    /// The first line that satisfies `f`, within `limit`.
    pub fn expect(&self, limit: Duration, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut seen = Vec::new();
        while let Some(left) = limit.checked_sub(start.elapsed()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if f(&l) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("no MQTT message {what} within {limit:?}; saw {seen:#?}");
    }
}

impl Drop for MqttSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Modbus TCP device: pymodbus serving coils, discrete inputs,
/// holding and input registers 0..99; input register 1 counts up.
pub struct ModbusDevice {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub port: u16,
}

impl ModbusDevice {
    pub fn start(port: u16, counter_ms: u32) -> ModbusDevice {
        // Carried in the binary, so tests and benches find it alike.
        let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel_modbus_device.py");
        std::fs::write(&script, include_str!("modbus_device.py")).unwrap();
        let mut child = Command::new(pymodbus_python())
            .arg(script)
            .args([port.to_string(), "1".into(), counter_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("READY"),
            "modbus device did not start: {line:?}"
        );
        ModbusDevice {
            child,
            stdin,
            stdout,
            port,
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.starts_with("err"), "{cmd}: {line}");
        line.trim().to_owned()
    }

    /// Sets a value: table `co`, `di`, `hr` or `ir`.
    pub fn set(&mut self, table: &str, addr: u16, value: i64) {
        self.command(&format!("set {table} {addr} {value}"));
    }

    pub fn get(&mut self, table: &str, addr: u16) -> i64 {
        let l = self.command(&format!("get {table} {addr}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ModbusDevice {
    fn drop(&mut self) {
        self.kill();
    }
}
