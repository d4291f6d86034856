//! Modbus TCP mapper (tokio-modbus), with the configData keys of
//! KubeEdge's Modbus mapper: on the device's `protocol` — `ip`, `port`,
//! `slaveID`; on each property's `visitors` — `register` (HoldingRegister,
//! InputRegister, CoilRegister, DiscreteInputRegister), `offset`, `limit`,
//! `scale`, `isSwap`, `isRegisterSwap`.
//!
//! Registers are read big-endian; `isRegisterSwap` reverses the order of
//! the registers (word swap), `isSwap` the two bytes within each register.
//! The model's `type` says how the bytes read: INT as a signed integer of
//! 1, 2 or 4 registers; FLOAT/DOUBLE as a scaled 16-bit integer (1
//! register), an IEEE f32 (2) or f64 (4); BOOLEAN as non-zero; STRING as
//! the registers' bytes. The raw number is multiplied by `scale` on read
//! and divided by it on write. `offset` is the zero-based protocol address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Map, Value as Json};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::Slave;

use super::{DevicePlan, Driver, DriverError, PlanError, PropertyPlan, cycle};
use crate::types::{DataType, Device, DeviceModel};
use crate::value::{Value, ValueError};

/// `protocolName` this mapper serves.
pub const PROTOCOL: &str = "modbus";
/// Time allowed for connecting or for one request.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Where the device is.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    pub addr: SocketAddr,
    pub slave: u8,
}

/// Modbus register tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    Holding,
    Input,
    Coil,
    DiscreteInput,
}

/// How one property is read and written.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    pub register: Register,
    pub offset: u16,
    pub limit: u16,
    pub scale: f64,
    pub swap: bool,
    pub register_swap: bool,
}

fn num(m: &Map<String, Json>, key: &str) -> Option<f64> {
    match m.get(key)? {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn flag(m: &Map<String, Json>, key: &str) -> bool {
    match m.get(key) {
        Some(Json::Bool(b)) => *b,
        Some(Json::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// The plan for `device` (of `model`): its address and every property the
/// model has a type for and the device (or model) has visitors for.
pub fn plan(
    device: &Device,
    model: &DeviceModel,
) -> Result<DevicePlan<Connection, Access>, PlanError> {
    let protocol = device.spec.protocol.as_ref();
    let name = protocol
        .and_then(|p| p.protocol_name.clone())
        .or_else(|| model.spec.protocol.clone());
    if name.as_deref().map(str::to_ascii_lowercase).as_deref() != Some(PROTOCOL) {
        return Err(PlanError::Protocol {
            expected: PROTOCOL,
            found: name,
        });
    }
    // The model's protocolConfigData, overridden by the device's.
    let mut cfg = model.spec.protocol_config_data.clone().unwrap_or_default();
    if let Some(c) = protocol.and_then(|p| p.config_data.as_ref()) {
        cfg.extend(c.clone());
    }
    let conn_err = |key, message: &str| PlanError::Connection {
        key,
        message: message.to_owned(),
    };
    let ip: IpAddr = match cfg.get("ip") {
        Some(Json::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| conn_err("ip", "not an IP address"))?,
        _ => return Err(conn_err("ip", "required")),
    };
    let port = num(&cfg, "port").ok_or_else(|| conn_err("port", "required"))?;
    if !(1.0..=65535.0).contains(&port) || port.fract() != 0.0 {
        return Err(conn_err("port", "must be 1..65535"));
    }
    let slave = match num(&cfg, "slaveID") {
        None => 1.0,
        Some(s) if (0.0..=255.0).contains(&s) && s.fract() == 0.0 => s,
        Some(_) => return Err(conn_err("slaveID", "must be 0..255")),
    };
    let mut properties = Vec::new();
    for dp in &device.spec.properties {
        let perr = |message: String| PlanError::Property {
            property: dp.name.clone(),
            message,
        };
        let Some(mp) = model.property(&dp.name) else {
            return Err(perr("not in the device model".to_owned()));
        };
        let data_type = mp
            .data_type
            .ok_or_else(|| perr("the model gives no type".to_owned()))?;
        let visitors = dp
            .visitors
            .as_ref()
            .and_then(|v| v.config_data.as_ref())
            .or_else(|| mp.visitors.as_ref().and_then(|v| v.config_data.as_ref()));
        let Some(v) = visitors else {
            return Err(perr("no visitors.configData".to_owned()));
        };
        let access = access(v, data_type).map_err(perr)?;
        properties.push(PropertyPlan {
            name: dp.name.clone(),
            data_type,
            model: mp.clone(),
            collect: cycle(dp.collect_cycle),
            access,
        });
    }
    Ok(DevicePlan {
        namespace: device
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: device.metadata.name.clone().unwrap_or_default(),
        connection: Connection {
            addr: SocketAddr::new(ip, port as u16),
            slave: slave as u8,
        },
        properties,
    })
}

fn access(v: &Map<String, Json>, ty: DataType) -> Result<Access, String> {
    let register = match v.get("register").and_then(Json::as_str) {
        Some("HoldingRegister") => Register::Holding,
        Some("InputRegister") => Register::Input,
        Some("CoilRegister") => Register::Coil,
        Some("DiscreteInputRegister") => Register::DiscreteInput,
        Some(other) => return Err(format!("unknown register {other:?}")),
        None => return Err("visitors.configData.register is required".to_owned()),
    };
    let offset = num(v, "offset").unwrap_or(0.0);
    if !(0.0..=65535.0).contains(&offset) || offset.fract() != 0.0 {
        return Err("offset must be 0..65535".to_owned());
    }
    let limit = num(v, "limit").unwrap_or(1.0);
    if !(1.0..=125.0).contains(&limit) || limit.fract() != 0.0 {
        return Err("limit must be 1..125".to_owned());
    }
    let scale = num(v, "scale").unwrap_or(1.0);
    if scale == 0.0 || !scale.is_finite() {
        return Err("scale must be a non-zero number".to_owned());
    }
    if matches!(ty, DataType::Bytes | DataType::Stream) {
        return Err(format!("type {ty:?} is not supported by the Modbus mapper"));
    }
    Ok(Access {
        register,
        offset: offset as u16,
        limit: limit as u16,
        scale,
        swap: flag(v, "isSwap"),
        register_swap: flag(v, "isRegisterSwap"),
    })
}

/// Applies `isRegisterSwap` / `isSwap` to registers (its own inverse).
fn arrange(words: &[u16], a: &Access) -> Vec<u16> {
    let mut w: Vec<u16> = words.to_vec();
    if a.register_swap {
        w.reverse();
    }
    if a.swap {
        for x in &mut w {
            *x = x.swap_bytes();
        }
    }
    w
}

fn be_bytes(words: &[u16]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

fn scaled(raw: f64, a: &Access, ty: DataType) -> Value {
    let x = raw * a.scale;
    match ty {
        DataType::Int => Value::Int(x.round() as i64),
        _ => Value::Float(x),
    }
}

/// Decodes registers read from the device.
pub fn decode(words: &[u16], a: &Access, ty: DataType) -> Result<Value, ValueError> {
    let w = arrange(words, a);
    let b = be_bytes(&w);
    let bad = || ValueError::Parse {
        value: format!("{words:?}"),
        ty,
    };
    Ok(match ty {
        DataType::Boolean => Value::Bool(w.iter().any(|x| *x != 0)),
        DataType::String => Value::Text(
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .to_owned(),
        ),
        DataType::Int => {
            let raw = match b.as_slice() {
                [a0, a1] => i16::from_be_bytes([*a0, *a1]) as f64,
                [a0, a1, a2, a3] => i32::from_be_bytes([*a0, *a1, *a2, *a3]) as f64,
                [a0, a1, a2, a3, a4, a5, a6, a7] => {
                    i64::from_be_bytes([*a0, *a1, *a2, *a3, *a4, *a5, *a6, *a7]) as f64
                }
                _ => return Err(bad()),
            };
            scaled(raw, a, ty)
        }
        DataType::Float | DataType::Double => {
            let raw = match b.as_slice() {
                [a0, a1] => i16::from_be_bytes([*a0, *a1]) as f64,
                [a0, a1, a2, a3] => f32::from_be_bytes([*a0, *a1, *a2, *a3]) as f64,
                [a0, a1, a2, a3, a4, a5, a6, a7] => {
                    f64::from_be_bytes([*a0, *a1, *a2, *a3, *a4, *a5, *a6, *a7])
                }
                _ => return Err(bad()),
            };
            if !raw.is_finite() {
                return Err(bad());
            }
            scaled(raw, a, ty)
        }
        DataType::Bytes | DataType::Stream => return Err(ValueError::Unsupported(ty)),
    })
}

/// Encodes `v` into `a.limit` registers.
pub fn encode(v: &Value, a: &Access, ty: DataType) -> Result<Vec<u16>, ValueError> {
    let out_of_range = || ValueError::Parse {
        value: v.to_string(),
        ty,
    };
    let raw = || -> Result<f64, ValueError> {
        let x = v.as_f64().ok_or_else(out_of_range)? / a.scale;
        if x.is_finite() {
            Ok(x)
        } else {
            Err(out_of_range())
        }
    };
    let words: Vec<u16> = match (ty, a.limit) {
        (DataType::Boolean, n) => {
            let mut w = vec![0u16; usize::from(n)];
            if let Some(last) = w.last_mut() {
                *last = u16::from(v.as_f64().is_some_and(|x| x != 0.0));
            }
            w
        }
        (DataType::String, n) => {
            let Value::Text(s) = v else {
                return Err(out_of_range());
            };
            let mut bytes = s.as_bytes().to_vec();
            if bytes.len() > usize::from(n) * 2 {
                return Err(out_of_range());
            }
            bytes.resize(usize::from(n) * 2, 0);
            bytes
                .chunks(2)
                .map(|c| match c {
                    [h, l] => u16::from_be_bytes([*h, *l]),
                    _ => 0,
                })
                .collect()
        }
        (DataType::Int | DataType::Float | DataType::Double, 1) => {
            let x = raw()?.round();
            if !(f64::from(i16::MIN)..=f64::from(i16::MAX)).contains(&x) {
                return Err(out_of_range());
            }
            vec![(x as i16) as u16]
        }
        (DataType::Int, 2) => {
            let x = raw()?.round();
            if !(f64::from(i32::MIN)..=f64::from(i32::MAX)).contains(&x) {
                return Err(out_of_range());
            }
            words_of(&(x as i32).to_be_bytes())
        }
        (DataType::Int, 4) => words_of(&(raw()?.round() as i64).to_be_bytes()),
        (DataType::Float | DataType::Double, 2) => words_of(&(raw()? as f32).to_be_bytes()),
        (DataType::Float | DataType::Double, 4) => words_of(&raw()?.to_be_bytes()),
        _ => return Err(out_of_range()),
    };
    Ok(arrange(&words, a))
}

fn words_of(b: &[u8]) -> Vec<u16> {
    b.chunks(2)
        .map(|c| match c {
            [h, l] => u16::from_be_bytes([*h, *l]),
            _ => 0,
        })
        .collect()
}

/// The Modbus TCP driver.
pub struct ModbusDriver {
    conn: Connection,
    ctx: Option<Context>,
}

impl std::fmt::Debug for ModbusDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusDriver")
            .field("conn", &self.conn)
            .field("connected", &self.ctx.is_some())
            .finish()
    }
}

impl ModbusDriver {
    pub fn new(conn: Connection) -> ModbusDriver {
        ModbusDriver { conn, ctx: None }
    }
}

fn unreachable(e: impl std::fmt::Display) -> DriverError {
    DriverError::Unreachable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<Result<T, tokio_modbus::ExceptionCode>, E>>,
) -> Result<T, DriverError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Err(_) => Err(DriverError::Unreachable("request timed out".to_owned())),
        Ok(Err(e)) => Err(unreachable(e)),
        Ok(Ok(Err(code))) => Err(DriverError::Refused(format!("exception {code:?}"))),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

impl Driver for ModbusDriver {
    type Access = Access;

    async fn connect(&mut self) -> Result<(), DriverError> {
        let fut = tokio_modbus::client::tcp::connect_slave(self.conn.addr, Slave(self.conn.slave));
        let ctx = tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| DriverError::Unreachable("connect timed out".to_owned()))?
            .map_err(unreachable)?;
        self.ctx = Some(ctx);
        Ok(())
    }

    async fn read(&mut self, p: &PropertyPlan<Access>) -> Result<Value, DriverError> {
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(DriverError::Unreachable("not connected".to_owned()));
        };
        let a = &p.access;
        match a.register {
            Register::Holding => {
                let w = timed(ctx.read_holding_registers(a.offset, a.limit)).await?;
                Ok(decode(&w, a, p.data_type)?)
            }
            Register::Input => {
                let w = timed(ctx.read_input_registers(a.offset, a.limit)).await?;
                Ok(decode(&w, a, p.data_type)?)
            }
            Register::Coil | Register::DiscreteInput => {
                let bits = if a.register == Register::Coil {
                    timed(ctx.read_coils(a.offset, a.limit)).await?
                } else {
                    timed(ctx.read_discrete_inputs(a.offset, a.limit)).await?
                };
                Ok(bits_value(&bits, p.data_type))
            }
        }
    }

    async fn write(&mut self, p: &PropertyPlan<Access>, v: &Value) -> Result<(), DriverError> {
        let a = &p.access;
        if matches!(a.register, Register::Input | Register::DiscreteInput) {
            return Err(DriverError::ReadOnly(p.name.clone()));
        }
        let words = if a.register == Register::Holding {
            encode(v, a, p.data_type)?
        } else {
            Vec::new()
        };
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(DriverError::Unreachable("not connected".to_owned()));
        };
        match (a.register, words.as_slice()) {
            (Register::Coil, _) => {
                let on = v.as_f64().is_some_and(|x| x != 0.0);
                timed(ctx.write_single_coil(a.offset, on)).await
            }
            (_, [one]) => timed(ctx.write_single_register(a.offset, *one)).await,
            (_, many) => timed(ctx.write_multiple_registers(a.offset, many)).await,
        }
    }

    fn disconnect(&mut self) {
        self.ctx = None;
    }
}

fn bits_value(bits: &[bool], ty: DataType) -> Value {
    match ty {
        DataType::Int | DataType::Float | DataType::Double => {
            let mut n: i64 = 0;
            for (i, b) in bits.iter().enumerate().take(63) {
                if *b {
                    n |= 1 << i;
                }
            }
            if ty == DataType::Int {
                Value::Int(n)
            } else {
                Value::Float(n as f64)
            }
        }
        DataType::String => Value::Text(bits.iter().map(|b| if *b { '1' } else { '0' }).collect()),
        _ => Value::Bool(bits.iter().any(|b| *b)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn acc(limit: u16, scale: f64, swap: bool, register_swap: bool) -> Access {
        Access {
            register: Register::Holding,
            offset: 0,
            limit,
            scale,
            swap,
            register_swap,
        }
    }

    #[test]
    fn known_layouts() {
        // 23.5 °C stored as 235 with scale 0.1.
        let a = acc(1, 0.1, false, false);
        assert_eq!(
            decode(&[235], &a, DataType::Float).unwrap(),
            Value::Float(23.5)
        );
        assert_eq!(
            encode(&Value::Float(23.5), &a, DataType::Float).unwrap(),
            [235]
        );
        // f32 1.0 = 0x3F80_0000, word-swapped.
        let a = acc(2, 1.0, false, true);
        assert_eq!(
            decode(&[0x0000, 0x3F80], &a, DataType::Float).unwrap(),
            Value::Float(1.0)
        );
        // Byte swap within registers.
        let a = acc(1, 1.0, true, false);
        assert_eq!(decode(&[0x0100], &a, DataType::Int).unwrap(), Value::Int(1));
        // Negative 16-bit.
        let a = acc(1, 1.0, false, false);
        assert_eq!(
            decode(&[0xFFFF], &a, DataType::Int).unwrap(),
            Value::Int(-1)
        );
        assert!(encode(&Value::Int(40_000), &a, DataType::Int).is_err());
        assert!(decode(&[1, 2, 3], &acc(3, 1.0, false, false), DataType::Int).is_err());
    }

    proptest! {
        #[test]
        fn int_roundtrip(x in any::<i32>(), swap: bool, rswap: bool) {
            let a = acc(2, 1.0, swap, rswap);
            let w = encode(&Value::Int(i64::from(x)), &a, DataType::Int).unwrap();
            prop_assert_eq!(decode(&w, &a, DataType::Int).unwrap(), Value::Int(i64::from(x)));
        }

        #[test]
        fn double_roundtrip(x in -1.0e300f64..1.0e300, swap: bool, rswap: bool) {
            let a = acc(4, 1.0, swap, rswap);
            let w = encode(&Value::Float(x), &a, DataType::Double).unwrap();
            prop_assert_eq!(decode(&w, &a, DataType::Double).unwrap(), Value::Float(x));
        }

        #[test]
        fn decode_never_panics(words in proptest::collection::vec(any::<u16>(), 0..6), swap: bool, rswap: bool) {
            for ty in [DataType::Int, DataType::Float, DataType::Double, DataType::Boolean, DataType::String] {
                let _ = decode(&words, &acc(words.len().max(1) as u16, 0.5, swap, rswap), ty);
            }
        }
    }
}
