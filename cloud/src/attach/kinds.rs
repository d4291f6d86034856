//! The kinds cloudcore mirrors from an attached cluster, and the device
//! CRDs it installs there when absent.

use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, PostParams};
use serde_json::Value;
use tracing::info;

use super::{AttachError, Attached, classify};

/// One kind of object cloudcore watches on the cluster.
#[derive(Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// `<plural>[.<group>]/`: the start of its registry keys.
    prefix: &'static str,
    /// Bound to a node by `spec.nodeName` (pods, devices).
    pub node_bound: bool,
    /// The edge writes its `status` (pods, devices).
    pub edge_status: bool,
    /// The node-bound kind whose objects use this one (a ConfigMap is used
    /// by pods, a DeviceModel by devices).
    pub used_by: Option<&'static Kind>,
    /// Narrows the watch (pods: only those already on a node).
    pub field_selector: Option<&'static str>,
}

static PODS: Kind = Kind {
    group: "",
    version: "v1",
    kind: "Pod",
    plural: "pods",
    prefix: "pods/",
    node_bound: true,
    edge_status: true,
    used_by: None,
    field_selector: Some("spec.nodeName!="),
};
static CONFIGMAPS: Kind = Kind {
    group: "",
    version: "v1",
    kind: "ConfigMap",
    plural: "configmaps",
    prefix: "configmaps/",
    node_bound: false,
    edge_status: false,
    used_by: Some(&PODS),
    field_selector: None,
};
static SECRETS: Kind = Kind {
    group: "",
    version: "v1",
    kind: "Secret",
    plural: "secrets",
    prefix: "secrets/",
    node_bound: false,
    edge_status: false,
    used_by: Some(&PODS),
    field_selector: None,
};
static DEVICES: Kind = Kind {
    group: "devices.kubeedge.io",
    version: "v1beta1",
    kind: "Device",
    plural: "devices",
    prefix: "devices.devices.kubeedge.io/",
    node_bound: true,
    edge_status: true,
    used_by: None,
    field_selector: None,
};
static DEVICE_MODELS: Kind = Kind {
    group: "devices.kubeedge.io",
    version: "v1beta1",
    kind: "DeviceModel",
    plural: "devicemodels",
    prefix: "devicemodels.devices.kubeedge.io/",
    node_bound: false,
    edge_status: false,
    used_by: Some(&DEVICES),
    field_selector: None,
};

/// Every kind mirrored; the ones others use come first, so that a first
/// list finds them cached.
pub static KINDS: [&Kind; 5] = [&CONFIGMAPS, &SECRETS, &DEVICE_MODELS, &PODS, &DEVICES];

impl Kind {
    /// The kind of a registry key.
    pub fn of_key(key: &str) -> Option<&'static Kind> {
        KINDS.iter().copied().find(|k| key.starts_with(k.prefix))
    }

    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// `<plural>` or `<plural>.<group>`, as registry keys and
    /// [`crate::api::registry::pod_refs`] name resources.
    pub fn qualified(&self) -> &'static str {
        self.prefix.trim_end_matches('/')
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    /// The registry key of an object of this kind.
    pub fn key_of(&self, obj: &Value) -> Option<String> {
        let name = obj.pointer("/metadata/name")?.as_str()?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        Some(format!("{}{ns}/{name}", self.prefix))
    }
}

const DEVICE_CRD: &str = include_str!("../../crds/devices.kubeedge.io_devices.yaml");
const DEVICE_MODEL_CRD: &str = include_str!("../../crds/devices.kubeedge.io_devicemodels.yaml");

/// Creates the Device and DeviceModel CRDs where the cluster has none,
/// waits until they are served, and notes whether Device has a `status`
/// subresource (keel's has; KubeEdge's has not).
pub async fn install_crds(a: &Attached) -> Result<(), AttachError> {
    let api: Api<CustomResourceDefinition> = Api::all(a.client.clone());
    for text in [DEVICE_MODEL_CRD, DEVICE_CRD] {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(text).map_err(|e| AttachError::Setup {
                server: a.server.clone(),
                what: "keel's device CRD".into(),
                message: e.to_string(),
            })?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        let existing = api
            .get_opt(&name)
            .await
            .map_err(|e| classify(&a.server, &format!("reading CRD {name}"), &e))?;
        if existing.is_none() {
            match api.create(&PostParams::default(), &crd).await {
                Ok(_) => info!(crd = %name, "installed the CRD"),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(classify(&a.server, &format!("creating CRD {name}"), &e)),
            }
        }
        let mut established = false;
        for _ in 0..150 {
            let crd = api
                .get_opt(&name)
                .await
                .map_err(|e| classify(&a.server, &format!("reading CRD {name}"), &e))?;
            let Some(crd) = crd else {
                break;
            };
            if name.starts_with("devices.") {
                let sub = crd
                    .spec
                    .versions
                    .iter()
                    .find(|v| v.name == "v1beta1")
                    .and_then(|v| v.subresources.as_ref())
                    .is_some_and(|s| s.status.is_some());
                a.device_status_subresource.store(sub, Ordering::Relaxed);
            }
            established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !established {
            return Err(AttachError::Setup {
                server: a.server.clone(),
                what: format!("CRD {name}"),
                message: "not established within 30 s".into(),
            });
        }
    }
    Ok(())
}
