//! Device and DeviceModel, as KubeEdge's `devices.kubeedge.io/v1beta1`
//! CRDs define them. A Device or DeviceModel written to those schemas
//! decodes here unchanged, and encodes back to the same JSON: the cloud's
//! strict field validation relies on that round trip.
//!
//! Twin state lives in the Device's `status.twins`, in the layout of
//! KubeEdge's DeviceStatus (`propertyName`, `reported`, `observedDesired`),
//! since the v1beta1 Device status keeps unknown fields. The desired value
//! is `spec.properties[].desired.value` (written by the cloud); reported
//! values are written by the edge node the device is bound to.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// API group of devices and device models.
pub const GROUP: &str = "devices.kubeedge.io";
/// The one version served.
pub const VERSION: &str = "v1beta1";
/// `apiVersion` of both kinds.
pub const API_VERSION: &str = "devices.kubeedge.io/v1beta1";

fn device_kind() -> String {
    "Device".to_owned()
}
fn model_kind() -> String {
    "DeviceModel".to_owned()
}
fn api_version() -> String {
    API_VERSION.to_owned()
}

/// A device instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "device_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeviceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

/// `spec` of a Device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model_ref: Option<ModelRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<DeviceProperty>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<DeviceMethod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report: Option<StateReport>,
}

/// `spec.deviceModelRef`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    #[serde(default)]
    pub name: String,
}

/// One property of a device: how to reach it and what the cloud wants it
/// to be.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<Visitors>,
    /// Milliseconds between reads of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<i64>,
    /// Milliseconds between reports of the twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Where else readings are pushed (databases, HTTP, MQTT). Kept as
    /// given; keel records readings in the log instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<Value>,
}

/// A value with string metadata: `desired`, `reported`, `observedDesired`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `visitors` of a property: protocol-specific access data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Visitors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_data: Option<Map<String, Value>>,
}

/// `spec.methods[]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub property_names: Vec<String>,
}

/// `spec.protocol`: the protocol name and its connection data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_data: Option<Map<String, Value>>,
}

/// `spec.stateReport`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
}

/// `status` of a Device: the schema's fields plus KubeEdge's DeviceStatus
/// fields (twins, state, lastOnlineTime), and anything else kept as given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_time: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One twin property: what the edge reported, and the desired value the
/// edge had seen when it reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    #[serde(default)]
    pub property_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinValue>,
}

/// A device model: the properties a kind of device has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModel {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "model_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DeviceModelSpec,
}

/// `spec` of a DeviceModel.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<ModelProperty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_config_data: Option<Map<String, Value>>,
}

/// One property of a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub data_type: Option<DataType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<Visitors>,
}

/// `type` of a model property (the schema's enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    Int,
    Float,
    Double,
    String,
    Boolean,
    Bytes,
    Stream,
}

/// `accessMode` of a model property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    ReadWrite,
    ReadOnly,
}

impl Device {
    /// The model's name, if any.
    pub fn model_name(&self) -> Option<&str> {
        self.spec
            .device_model_ref
            .as_ref()
            .map(|r| r.name.as_str())
            .filter(|n| !n.is_empty())
    }

    /// The twin of `property`, if the status has one.
    pub fn twin(&self, property: &str) -> Option<&Twin> {
        self.status
            .as_ref()
            .and_then(|s| s.twins.iter().find(|t| t.property_name == property))
    }
}

impl DeviceModel {
    /// The model property called `name`.
    pub fn property(&self, name: &str) -> Option<&ModelProperty> {
        self.spec.properties.iter().find(|p| p.name == name)
    }
}

#[cfg(feature = "kube")]
mod kube_impl {
    use std::borrow::Cow;

    use kube_core::{NamespaceResourceScope, Resource};

    use super::*;

    macro_rules! resource {
        ($t:ty, $kind:literal, $plural:literal) => {
            impl Resource for $t {
                type DynamicType = ();
                type Scope = NamespaceResourceScope;
                fn kind(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed($kind)
                }
                fn group(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed(GROUP)
                }
                fn version(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed(VERSION)
                }
                fn plural(_: &()) -> Cow<'_, str> {
                    Cow::Borrowed($plural)
                }
                fn meta(&self) -> &ObjectMeta {
                    &self.metadata
                }
                fn meta_mut(&mut self) -> &mut ObjectMeta {
                    &mut self.metadata
                }
            }
        };
    }
    resource!(Device, "Device", "devices");
    resource!(DeviceModel, "DeviceModel", "devicemodels");
}
