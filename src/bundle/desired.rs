//! The trust-bundle ConfigMap every namespace must hold, and the one write (if any) that makes
//! an existing one right. Pure: compared before anything is written, so a correct ConfigMap
//! costs nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub const CONFIG_MAP_NAME: &str = "istio-ca-root-cert";
pub const DATA_KEY: &str = "root-cert.pem";
pub const LABEL_KEY: &str = "istio.io/config";
pub const LABEL_VALUE: &str = "true";

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    None,
    Create(ConfigMap),
    /// The existing object, repaired; it carries its resourceVersion, so the write fails if
    /// someone changed it since it was read.
    Replace(ConfigMap),
}

/// What `namespace` needs, given its current ConfigMap (`None`: missing) and the bundle PEM.
pub fn change_for(namespace: &str, existing: Option<&ConfigMap>, pem: &str) -> Change {
    let Some(existing) = existing else {
        return Change::Create(ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIG_MAP_NAME.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(LABEL_KEY.into(), LABEL_VALUE.into())])),
                ..Default::default()
            },
            data: Some(wanted_data(pem)),
            ..Default::default()
        });
    };
    if is_right(existing, pem) {
        return Change::None;
    }
    let mut repaired = existing.clone();
    repaired
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_KEY.into(), LABEL_VALUE.into());
    // Only the bundle: istio-csr drops any other key, and so do we.
    repaired.data = Some(wanted_data(pem));
    repaired.binary_data = None;
    repaired.metadata.managed_fields = None;
    Change::Replace(repaired)
}

fn wanted_data(pem: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(DATA_KEY.into(), pem.into())])
}

fn is_right(config_map: &ConfigMap, pem: &str) -> bool {
    let labelled = config_map
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_KEY))
        .is_some_and(|v| v == LABEL_VALUE);
    let data_right = config_map
        .data
        .as_ref()
        .is_some_and(|d| d.len() == 1 && d.get(DATA_KEY).is_some_and(|v| v == pem));
    let no_binary = config_map.binary_data.as_ref().is_none_or(|b| b.is_empty());
    labelled && data_right && no_binary
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    fn right() -> ConfigMap {
        match change_for("app", None, PEM) {
            Change::Create(cm) => cm,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_config_map_is_created_with_name_key_and_label() {
        let cm = right();
        assert_eq!(cm.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("app"));
        assert_eq!(
            cm.metadata
                .labels
                .unwrap()
                .get("istio.io/config")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            cm.data.unwrap().get("root-cert.pem").map(String::as_str),
            Some(PEM)
        );
    }

    #[test]
    fn a_right_config_map_needs_no_write_even_with_other_labels_and_annotations() {
        let mut cm = right();
        cm.metadata.resource_version = Some("42".into());
        cm.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "a".into());
        cm.metadata.annotations = Some(BTreeMap::from([("note".into(), "x".into())]));
        assert_eq!(change_for("app", Some(&cm), PEM), Change::None);
    }

    #[test]
    fn repairs_wrong_pem_missing_label_extra_keys_and_binary_data() {
        let mut wrong_pem = right();
        wrong_pem.data = Some(wanted_data("old"));
        let mut no_label = right();
        no_label.metadata.labels = None;
        let mut wrong_label = right();
        wrong_label.metadata.labels = Some(BTreeMap::from([(LABEL_KEY.into(), "false".into())]));
        let mut extra_key = right();
        extra_key
            .data
            .as_mut()
            .unwrap()
            .insert("extra".into(), "x".into());
        let mut binary = right();
        binary.binary_data = Some(BTreeMap::from([(
            "blob".into(),
            k8s_openapi::ByteString(vec![1]),
        )]));
        let mut no_data = right();
        no_data.data = None;
        for (what, mut cm) in [
            ("wrong pem", wrong_pem),
            ("no label", no_label),
            ("wrong label", wrong_label),
            ("extra key", extra_key),
            ("binary data", binary),
            ("no data", no_data),
        ] {
            cm.metadata.resource_version = Some("7".into());
            cm.metadata.annotations = Some(BTreeMap::from([("keep".into(), "me".into())]));
            let Change::Replace(fixed) = change_for("app", Some(&cm), PEM) else {
                panic!("{what}: no repair");
            };
            assert_eq!(change_for("app", Some(&fixed), PEM), Change::None, "{what}");
            assert_eq!(
                fixed.metadata.resource_version.as_deref(),
                Some("7"),
                "{what}"
            );
            assert_eq!(
                fixed
                    .metadata
                    .annotations
                    .unwrap()
                    .get("keep")
                    .map(String::as_str),
                Some("me"),
                "{what}: other metadata is kept"
            );
        }
    }
}
