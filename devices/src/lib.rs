//! keel-devices: KubeEdge-compatible Device and DeviceModel types
//! (`devices.kubeedge.io/v1beta1`), the twin model (desired / reported per
//! property, in the Device object), local fallback rules, and the mapper
//! framework with a Modbus TCP mapper. Knows nothing of cloud or edge.

pub mod mapper;
pub mod twin;
pub mod types;
pub mod value;

pub use types::{Device, DeviceModel};
